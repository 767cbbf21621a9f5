"""Score a nanoUMM checkpoint on understanding, generation and editing; synth.parse is the judge.

    python eval.py --ckpt out/pretrain            # a run's newest checkpoint, EMA weights, val
    python eval.py --ckpt out/pretrain/step_003600 --split test_ood --out results/ood.json
    python eval.py --baseline universal           # a chance row: a trivial model on the same sets
    python eval.py --compare results/uniedit2/dense --rows base,uniedit   # mean ± std, differences
    python eval.py -h                             # every count and sampling knob

The sets are synth.make_sample(world, task, split, i) with data seed 0, so every checkpoint of a
world sees the same questions, prompts and edits; --seed only seeds the sampling noise, drawn per
sample (a pure function of seed, sample id and draw), so neither the batch size nor the number of
ranks changes which noise an image starts from. The judge reads a cell only when it is sure (see
synth.parse): a cell it cannot read is malformed, which equals no object.

  understanding  exact-match VQA accuracy, per family and per hop depth
  generation     ShapeEval-strict (the headline): the image holds exactly the objects the prompt
                 describes and nothing else, no extra and no unreadable object. ShapeEval, GenEval's
                 rule (for comparison with papers): every include/exclude clause holds, on the
                 prompt's shapes only, the color and position judged on the most salient object(s)
                 of a shape (large before small, then reading order), a position only where its
                 direction dominates the offset; extra objects go unpunished. Both per category and
                 overall = the mean of the six categories (equal prompts per category); several
                 images per prompt. Full-scene captions: exact-scene rate and object F1.
  editing        simple (synth task "edit") and intelligent ("uniedit") separately, per sample and
                 then averaged (GEdit's order), comparing the grid cell by cell (a cell holds an
                 object, nothing, or a malformed blob):
                   success       the output parses to exactly the target scene
                   following     of the cells that should change, the share equal to the target;
                                 for a no-op edit 1 if nothing changed, else 0
                   preservation  of ALL the cells that should stay (empty ones too, so clutter
                                 counts), the share unchanged
                   overall       sqrt(following x preservation)
                   pixel L1      mean |output - target| / 255 over the pixels of should-stay cells
                 by family and logic level; "unseen": intelligent edits whose instruction is not in
                 the train split of --unseen_from (a tuning set).
  consistency    (intelligent edits) the 2x2 table of probe answer right/wrong x edit right/wrong,
                 P(edit right | probe right) and P(edit right | probe wrong); and self-consistency:
                 the share of edits whose output equals the edit implied by the model's own answer
                 to the embedded question (synth.implied_target; "If it is red, paint it blue"
                 answered "green" implies no change), over the edits an answer decides.
  probes         (checkpoints only) where a failure sits: linear_probe (can the semantic tokens'
                 attributes be read off linearly: perception) and placement_probe (does the trunk
                 know each cell of a full-scene caption or an add edit from the text before the
                 image shows it: placement).

Chance rows (--baseline NAME, and in every table): trivial models scored on the same sets.
  oracle     the true answers and target images: 1.0 on every metric (pixel L1 0)
  blind      answers from the question text alone: the majority answer to the same text among
             20,000 train questions, else of its kind (e.g. "query color"); draws nothing
  source     edits: the source image, unchanged
  blank      generation and edits: a black image
  universal  generation and edits: one fixed image, the one of the first 1,000 train T2I and
             1,000 VQA images with the best GenEval-rule score on 16 train prompts per category
  random     a random train answer to a question of the same kind; a random train T2I image; for
             edits a random train edit's target
A part a baseline does not do (blind draws nothing) is null in its eval.json and "-" in tables.

Intervals: every headline metric has a bootstrap 95% interval (1,000 resamples of the eval
items: questions, prompts with all their images, edits). --compare gives mean ± std over seeds
and, for each row against the first, a paired bootstrap interval of the difference (the same
item and seed resamples for both rows; * where it excludes 0).

Writes eval.json (or --out), and beside it eval.md (the tables, also printed) and eval.png (a
labelled picture of the first outputs); the default --out is CHECKPOINT/eval.json for val and
CHECKPOINT/eval_<split>.json otherwise. train.py calls evaluate() at each eval with small counts.
"""
import argparse
import json
import math
import os
import random
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import synth
from model import (CELL_CLASSES, EOS, TASK_GROUP, cell_labels, collate, euler, load_checkpoint,
                   newest_checkpoint, patchify)

GENEVAL = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BATCH = 64  # samples per forward pass
RESAMPLES = 1000  # bootstrap resamples behind every 95% interval


@dataclass
class Sampling:
    steps: int = 20  # Euler steps from noise to image
    shift: float = 1.0  # timestep shift s >= 1; 32-64 px images need none
    cfg: float = 2.0  # text guidance scale for T2I
    cfg_img: float = 1.5  # edit guidance: source image scale ...
    cfg_txt: float = 2.0  # ... and instruction scale (Ovis-U1's dual guidance)

    def __post_init__(self):
        if self.steps < 1 or not 1 <= self.shift < math.inf:
            raise ValueError(f"sampling needs steps >= 1 and shift >= 1, got steps={self.steps}, "
                             f"shift={self.shift}")
        for key in ("cfg", "cfg_img", "cfg_txt"):
            scale = getattr(self, key)
            if not 0 <= scale < math.inf:  # NaN fails too: it made every image black
                raise ValueError(f"--{key}={scale} is out of range: a guidance scale is >= 0")


# ----------------------------------------------------------------------------- model calls
# Shared with sample.py: every model call of both scripts goes through these helpers.

def world_of(meta):
    """The synth World a checkpoint was trained on, from its config.json."""
    return synth.world_from_json(meta["world"])


def load(ckpt, weights="ema", device="cpu"):
    """(model, tokenizer, world, checkpoint folder, meta); a run folder means its newest checkpoint.
    Refuses a checkpoint of a world this synth.py draws differently: its scores would mean
    nothing."""
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    model, tok, meta = load_checkpoint(ckpt, weights, device)
    name = meta["world"].get("name")
    now = json.loads(json.dumps(asdict(synth.WORLDS[name]))) if name in synth.WORLDS else None
    if meta["world"] != now:
        raise ValueError(f"checkpoint {ckpt} was trained on a world {name!r} that this synth.py "
                         f"no longer draws (its images or judge differ): retrain it, or evaluate "
                         f"it at its own commit")
    world = world_of(meta)
    if world.size != model.cfg.image_size:
        raise ValueError(f"checkpoint {ckpt}: world {world.name!r} is {world.size} px but the "
                         f"model takes {model.cfg.image_size} px")
    return model, tok, world, newest_checkpoint(ckpt), meta


def to_uint8(x):
    """(B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3), the renderer's format."""
    return ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def on(device, sub):
    return {k: v.to(device) for k, v in sub.items()}


@torch.no_grad()
def answer(model, tok, questions, device="cpu"):
    """Greedy answers (str) to vqa-shaped dicts {"text", "image"}, one forward per BATCH."""
    out = []
    for i in range(0, len(questions), BATCH):
        part = [{**q, "task": "vqa", "answer": None} for q in questions[i:i + BATCH]]
        for ids in model.generate_text(on(device, collate(part, model.cfg, tok)["vqa"])).tolist():
            out.append(tok.decode(ids[:ids.index(EOS)] if EOS in ids else ids).strip())
    return out


def noise(key, seed, size):
    """The starting noise (3, S, S) of one image: a function of (seed, key), not of batching."""
    g = torch.Generator().manual_seed(synth.sample_seed("noise", seed, key))
    return torch.randn(3, size, size, generator=g)


@torch.no_grad()
def draw(model, tok, samples, keys, sampling, seed=0, device="cpu"):
    """Images (uint8 (B, S, S, 3)) for t2i prompts or edits (a source "image" and an instruction
    "text"), all of one task group; keys name each image's noise: a prompt drawn 4 times has 4."""
    task = TASK_GROUP[samples[0]["task"]]
    sub = on(device, collate([{**s, "target": None} for s in samples], model.cfg, tok)[task])
    x = torch.stack([noise(k, seed, model.cfg.image_size) for k in keys]).to(device)  # (B, 3, S, S)
    txt, img = (sampling.cfg, 1.0) if task == "t2i" else (sampling.cfg_txt, sampling.cfg_img)
    if (txt, img) == (1.0, 1.0):  # guidance at scale 1 is the conditional velocity: one pass
        fn = lambda x_t, t: model.velocity(task, sub, x_t, t)
    else:
        fn = lambda x_t, t: model.guided_velocity(task, sub, x_t, t, txt, img)
    return to_uint8(euler(fn, x, sampling.steps, sampling.shift).clamp(-1, 1))


# ----------------------------------------------------------------------------- judging one output

MALFORMED = "malformed"  # what a cell the parser could not read holds: it equals no object


def cell_map(scene):
    """Scene (or [[shape, color, size, row, col], ..]) -> {(row, col): (shape, color, size) or
    MALFORMED}."""
    if not isinstance(scene, synth.Scene):
        scene = synth.Scene.of(scene)
    cells = {(o.row, o.col): tuple(o[:3]) for o in scene.objects}
    cells.update({tuple(c): MALFORMED for c in scene.malformed})
    return cells


ERRORS = ("malformed", "wrong shape", "wrong color", "wrong size", "wrong cell", "missing",
          "extra")


def cell_errors(got, wanted):
    """The wrong cells of an output's cell map against the wanted one, counted by kind (ERRORS):
    malformed (unreadable); wrong shape / color / size (an object other than the wanted one: its
    first differing attribute); wrong cell (the wanted object drawn in a cell meant to be empty
    while its own cell is left empty: one error, not a missing and an extra); missing (empty where
    an object was wanted); extra (an object where none was wanted)."""
    errors = Counter()
    missing, extra = [], []
    for cell in sorted(set(got) | set(wanted)):
        g, w = got.get(cell), wanted.get(cell)
        if g == w:
            continue
        if g == MALFORMED:
            errors["malformed"] += 1
        elif g is None:
            missing.append(w)
        elif w is None:
            extra.append(g)
        else:
            errors[next(f"wrong {a}" for a, x, y in zip(synth.ATTRS, g, w) if x != y)] += 1
    for obj in extra:
        if obj in missing:
            missing.remove(obj)
            errors["wrong cell"] += 1
        else:
            errors["extra"] += 1
    errors["missing"] += len(missing)
    return {k: errors[k] for k in ERRORS}


def judge_t2i(image, sample, world):
    """One generated image: strict and GenEval-rule verdicts (None: GenEval has no rule for
    full-scene captions), the object counts of a full-scene caption's F1 and its cell errors."""
    scene = synth.parse(image, world)
    geneval = sample["geneval"] and synth.geneval_holds(sample["geneval"], scene.objects, world)
    wanted = {(d["row"], d["col"]): (d["shape"], d["color"], d["size"])
              for d in sample["describes"] if "row" in d}
    got = cell_map(scene)
    return {"strict": synth.holds_exactly(sample["describes"], scene) and geneval is not False,
            "geneval": geneval, "tp": sum(got.get(cell) == obj for cell, obj in wanted.items()),
            "pred": len(got), "truth": len(wanted),
            "errors": cell_errors(got, wanted) if sample["family"] == "scene" else None}


def judge_edit(image, sample, world, scene=None):
    """One edited image (parsed: `scene`) against its sample's source and target (see the module
    docstring)."""
    out = cell_map(scene or synth.parse(image, world))
    src, tgt = cell_map(sample["scene"]), cell_map(sample["target_scene"])
    cells = [(r, c) for r in range(world.grid) for c in range(world.grid)]
    change = [x for x in cells if src.get(x) != tgt.get(x)]
    stay = [x for x in cells if src.get(x) == tgt.get(x)]
    followed = sum(out.get(x) == tgt.get(x) for x in change)
    kept = sum(out.get(x) == src.get(x) for x in stay)
    changed = sum(out.get(x) != src.get(x) for x in cells)
    following = followed / len(change) if change else float(changed == 0)  # a no-op: left alone?
    preservation = kept / len(stay) if stay else 1.0
    mask = np.zeros((world.size, world.size), bool)  # the pixels of the should-stay cells
    for r, c in stay:
        mask[r * world.cell:(r + 1) * world.cell, c * world.cell:(c + 1) * world.cell] = True
    diff = np.abs(np.asarray(image, np.float32) - np.asarray(sample["target"], np.float32)) / 255
    return {"success": all(out.get(x) == tgt.get(x) for x in cells), "following": following,
            "preservation": preservation, "overall": math.sqrt(following * preservation),
            "pixel_l1": float(diff[mask].mean()) if mask.any() else 0.0,
            "should_change": len(change), "followed": followed, "should_stay": len(stay),
            "kept": kept, "errors": cell_errors(out, tgt)}


def self_consistent(image, sample, said, world, scene=None):
    """Does the output (parsed: `scene`) equal the edit implied by the answer `said` to the
    embedded question? None where no answer decides the edit (location and quantified edits)."""
    e = sample["edit"]
    if e["if_answer"] is None and e["answer_sets"] is None:
        return None
    implied = synth.implied_target(sample, said, world)
    return implied is not None and cell_map(scene or synth.parse(image, world)) == cell_map(implied)


# ----------------------------------------------------------------------------- chance rows

BASELINES = ("oracle", "blind", "source", "blank", "universal", "random")


def question_kind(program):
    """What a question asks, for answers that ignore the image: "count", "query color", ..."""
    attr = program[0] in ("query", "pos", "same", "equal")
    return program[0] + (f" {program[1]}" if attr else "")


@lru_cache(maxsize=None)
def train_answers(world, n=20_000):
    """{question text: Counter of answers} and {question kind: Counter} over n train questions."""
    per_text, per_kind = defaultdict(Counter), defaultdict(Counter)
    for i in range(n):
        s = synth.make_sample(world, "vqa", "train", i)
        per_text[s["text"]][s["answer"]] += 1
        per_kind[question_kind(s["program"])][s["answer"]] += 1
    return dict(per_text), dict(per_kind)


def blind_answer(question, world):
    """The majority train answer to the same question text, else to questions of its kind."""
    per_text, per_kind = train_answers(world)
    votes = per_text.get(question["text"]) or per_kind[question_kind(question["program"])]
    return votes.most_common(1)[0][0]


@lru_cache(maxsize=None)
def universal_image(world, candidates=1000, per_category=16):
    """The fixed image of the `universal` row: of the first `candidates` train T2I and as many VQA
    images, the one with the best GenEval-rule score on `per_category` train prompts of each of the
    six categories (the first on ties). A clean render parses to its scene (a synth test), so the
    scene stands for the image. Chosen on train: the sets it is scored on play no part."""
    prompts, quota, i = [], Counter(), 0
    while len(prompts) < per_category * len(GENEVAL):
        s = synth.make_sample(world, "t2i", "train", i)
        if s["family"] in GENEVAL and quota[s["family"]] < per_category:
            quota[s["family"]] += 1
            prompts.append(s["geneval"])
        i += 1
    best, best_score = None, -1
    for task, key in (("t2i", "target"), ("vqa", "image")):
        for i in range(candidates):
            s = synth.make_sample(world, task, "train", i)
            objs = synth.Scene.of(s["target_scene"] if task == "t2i" else s["scene"]).objects
            score = sum(synth.geneval_holds(g, objs, world) for g in prompts)
            if score > best_score:
                best, best_score = s[key], score
    return best


@lru_cache(maxsize=None)
def train_images(world, task, n=2000):
    """The target images of the first n train samples of a task: the `random` row's pool."""
    return [synth.make_sample(world, task, "train", i)["target"] for i in range(n)]


@dataclass(frozen=True)
class Baseline:
    """A trivial model for a chance row (see the module docstring); None where it does nothing."""
    name: str
    world: synth.World
    seed: int = 0

    def rng(self, key):
        return random.Random(synth.sample_seed(self.name, self.seed, key))

    def answer(self, questions):
        if self.name == "oracle":
            return [q["answer"] for q in questions]
        if self.name == "blind":
            return [blind_answer(q, self.world) for q in questions]
        if self.name == "random":
            per_kind = train_answers(self.world)[1]
            votes = [per_kind[question_kind(q["program"])] for q in questions]
            return [self.rng(q["text"]).choices(list(v), weights=list(v.values()))[0]
                    for q, v in zip(questions, votes)]
        return None

    def draw(self, samples, keys):
        t2i = samples[0]["task"] == "t2i"
        blank = np.zeros((self.world.size, self.world.size, 3), np.uint8)
        if self.name == "oracle":
            return [s["target"] for s in samples]
        if self.name == "source" and not t2i:
            return [s["image"] for s in samples]
        if self.name == "blank":
            return [blank for _ in samples]
        if self.name == "universal":
            return [universal_image(self.world) for _ in samples]
        if self.name == "random":
            pool = train_images(self.world, "t2i" if t2i else "edit")
            return [self.rng(k).choice(pool) for k in keys]
        return None


# ----------------------------------------------------------------------------- metrics, intervals
# Every headline metric is a statistic of one part's per-item columns, so one definition gives the
# value, its bootstrap interval (columns resampled over items: (RESAMPLES, n)) and --compare's
# paired differences. A T2I item is a prompt (its images averaged): its images resample together.

def mean(x):
    return x.mean(-1)


def share(x, given):
    """The share of `x` among the items where `given` holds (NaN where none does)."""
    return (x * given).sum(-1) / given.sum(-1)


def f1(c):
    return 2 * c["tp"].sum(-1) / (c["pred"].sum(-1) + c["truth"].sum(-1))


def decided(x):
    """The share of True among the items where x is defined (not NaN)."""
    return share(np.nan_to_num(x), ~np.isnan(x))


METRICS = {  # key: (label, part, statistic of the part's columns)
    "vqa_acc": ("VQA accuracy", "vqa", lambda c: mean(c["correct"])),
    "shapeeval": ("ShapeEval-strict: exactly the described objects", "t2i",
                  lambda c: mean(c["strict"])),
    "shapeeval_geneval": ("ShapeEval, GenEval's rule", "t2i", lambda c: mean(c["geneval"])),
    "scene_exact": ("full-scene captions: exact scene", "scene", lambda c: mean(c["exact"])),
    "scene_f1": ("full-scene captions: object F1", "scene", f1),
    **{f"{short}_{m}": (f"{part} edits: {m.replace('_', ' ')}", part, lambda c, m=m: mean(c[m]))
       for short, part in (("edit", "simple"), ("uniedit", "intelligent"))
       for m in ("success", "following", "preservation", "overall", "pixel_l1")},
    "uniedit_unseen_success": ("intelligent edits, unseen instructions: success", "intelligent",
                               lambda c: share(c["success"], c["unseen"])),
    "probe_acc": ("intelligent edits: probe accuracy", "intelligent",
                  lambda c: mean(c["probe_correct"])),
    "edit_if_probe_right": ("edit right when the probe is answered right", "intelligent",
                            lambda c: share(c["success"], c["probe_correct"])),
    "edit_if_probe_wrong": ("edit right when the probe is answered wrong", "intelligent",
                            lambda c: share(c["success"], 1 - c["probe_correct"])),
    "self_consistency": ("self-consistency: the edit its own answer implies", "intelligent",
                         lambda c: decided(c["self_consistent"])),
}
HEADLINE = ("vqa_acc", "shapeeval", "shapeeval_geneval", "scene_f1", "edit_success", "edit_overall",
            "uniedit_success", "uniedit_overall", "self_consistency")  # train.py's log line


def columns(items):
    """A part's item columns as float arrays (None -> NaN), shape (1, n)."""
    return {k: np.array([np.nan if v is None else float(v) for v in vs])[None]
            for k, vs in items.items()}


def statistic(key, items, idx=None):
    """METRICS[key] over a part's items, resampled by idx (B, n) if given: (B,), NaN where
    undefined."""
    label, part, fn = METRICS[key]
    undefined = np.full(1 if idx is None else len(idx), np.nan)
    if not items.get(part, {}).get("index"):
        return undefined
    cols = columns(items[part])
    if idx is not None:
        cols = {k: v[0][idx] for k, v in cols.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        try:
            return fn(cols)
        except KeyError:  # a column the part lacks: a baseline that edits but never answers
            return undefined


def finite(x):
    return None if x is None or not np.isfinite(x) else float(x)


def interval(key, items):
    """{"value", "ci": [lo, hi]}: the metric and its bootstrap 95% interval over the items."""
    value = finite(statistic(key, items)[0])
    n = len(items.get(METRICS[key][1], {}).get("index", []))
    if value is None:
        return {"value": None, "ci": None}
    idx = np.random.default_rng(0).integers(0, n, (RESAMPLES, n))
    reps = statistic(key, items, idx)
    reps = reps[np.isfinite(reps)]
    return {"value": value, "ci": [float(x) for x in np.percentile(reps, [2.5, 97.5])]}


def item_table(recs, part, cols):
    return {c: [r[c] for r in recs if r["part"] == part] for c in ("index",) + cols}


def summarize(recs, counts):
    """The results dict from every item's record (gathered from all ranks): counts, metrics with
    intervals, breakdowns, the 2x2 consistency table, a few answers, and the per-item columns."""
    per_prompt = defaultdict(list)  # a T2I item is a prompt: its images' verdicts, averaged
    for r in recs:
        if r["part"] in ("t2i", "scene"):
            per_prompt[r["part"], r["index"]].append(r)
    prompts = [{"part": part, "index": i, "family": rs[0]["family"],
                "strict": np.mean([r["strict"] for r in rs]),
                "geneval": None if part == "scene" else np.mean([r["geneval"] for r in rs]),
                "exact": np.mean([r["strict"] for r in rs]),
                **{k: sum(r[k] for r in rs) for k in ("tp", "pred", "truth")}}
               for (part, i), rs in sorted(per_prompt.items())]
    edit_cols = ("success", "following", "preservation", "overall", "pixel_l1")
    ie = [r for r in recs if r["part"] == "intelligent"]
    answered = bool(ie) and ie[0]["probe_correct"] is not None
    items = {
        "vqa": item_table(recs, "vqa", ("correct",)),
        "t2i": item_table(prompts, "t2i", ("strict", "geneval")),
        "scene": item_table(prompts, "scene", ("exact", "tp", "pred", "truth")),
        "simple": item_table(recs, "simple", edit_cols),
        "intelligent": item_table(recs, "intelligent", edit_cols + ("unseen",) + (
            ("probe_correct", "self_consistent") if answered else ())),
    }
    plain = lambda v: float(v) if isinstance(v, (bool, np.floating)) else v  # JSON-able
    items = {part: {k: [plain(v) for v in vs] for k, vs in cols.items()}
             for part, cols in items.items() if cols["index"]}

    def by(rows, key, fields):
        groups = defaultdict(list)
        for r in rows:
            groups[str(r[key])].append(r)
        return {k: {"n": len(g), **{f: float(np.mean([r[f] for r in g])) for f in fields}}
                for k, g in sorted(groups.items())}
    vqa = [r for r in recs if r["part"] == "vqa"]
    geneval = [p for p in prompts if p["part"] == "t2i"]
    judged = {part: [r["errors"] for r in recs if r["part"] == part]
              for part in ("scene", "simple", "intelligent")}
    table = Counter((r["probe_correct"], r["success"]) for r in ie) if answered else Counter()
    return {
        "counts": counts,
        "metrics": {k: interval(k, items) for k in METRICS},
        "understanding": {"by_family": by(vqa, "family", ("correct",)),
                          "by_hops": by(vqa, "hops", ("correct",)),
                          "examples": [{k: r[k] for k in ("text", "said", "truth")}
                                       for r in vqa[:8]]},
        "generation": {"by_category": by(geneval, "family", ("strict", "geneval"))},
        "editing": {name: {"by_family": by(g, "family", edit_cols),
                           "by_level": by(g, "level", edit_cols)}
                    for name in ("simple", "intelligent")
                    for g in [[r for r in recs if r["part"] == name]]},
        "cell_errors": {part: {k: sum(e[k] for e in es) / len(es) for k in ERRORS}
                        for part, es in judged.items() if es},  # per image
        "consistency": {f"probe {p} / edit {e}": table[pk, ek]
                        for p, pk in (("right", True), ("wrong", False))
                        for e, ek in (("right", True), ("wrong", False))} if answered else None,
        "items": items,
    }


def headline(r):
    """The few numbers worth one log line: {name: value}."""
    return {k: r["metrics"][k]["value"] for k in HEADLINE}


# ----------------------------------------------------------------------------- pictures

SCALE = 2  # picture images are drawn at 2x (128 px for the 64 px worlds), nearest neighbour
PER_ROW = 4  # samples side by side in a picture
GAP, LINE = 6, 12  # px between images, and per line of text


def draw_picture(gallery, path):
    """A picture a person reads at a glance: per part a titled band of samples, each three framed
    images labelled source | output | target (T2I: output | an example of a right image), and the
    prompt or instruction with the judge's verdict wrapped under them. Returns where each image
    went: {(part, k, label): (x, y)}, its top-left corner."""
    font = ImageFont.load_default()
    side = next(im for rows in gallery.values() for _, im, _ in rows).shape[0] * SCALE
    block_w = 3 * side + 2 * GAP
    chars = block_w // 6  # the default font is about 6 px per character
    bands, where = [], {}
    for part, title in (("t2i", "T2I prompts"), ("simple", "simple edits"),
                        ("intelligent", "intelligent edits")):
        rows = gallery.get(part, [])
        if not rows:
            continue
        texts = [textwrap.wrap(s["text"], chars)[:5] + textwrap.wrap(v, chars) for s, _, v in rows]
        block_h = LINE + side + GAP + LINE * max(len(t) for t in texts)
        height = 2 * LINE + math.ceil(len(rows) / PER_ROW) * (block_h + 3 * GAP)
        sheet = Image.new("RGB", (PER_ROW * (block_w + 3 * GAP) + GAP, height), (40, 40, 40))
        pen = ImageDraw.Draw(sheet)
        pen.text((GAP, GAP), title, fill=(255, 255, 255), font=font)
        top = sum(b.height for b in bands)  # of this band in the picture
        for k, ((s, im, _), text) in enumerate(zip(rows, texts)):
            x = GAP + (k % PER_ROW) * (block_w + 3 * GAP)
            y = 2 * LINE + (k // PER_ROW) * (block_h + 3 * GAP)
            cols = [("output", im), ("an example", s["target"])] if part == "t2i" else \
                [("source", s["image"]), ("output", im), ("target", s["target"])]
            for j, (label, image) in enumerate(cols):
                xj = x + j * (side + GAP)
                big = Image.fromarray(np.asarray(image)).resize((side, side), Image.NEAREST)
                pen.text((xj, y), label, fill=(200, 200, 200), font=font)
                frame = [xj - 1, y + LINE - 1, xj + side, y + LINE + side]
                pen.rectangle(frame, outline=(120, 120, 120))
                sheet.paste(big, (xj, y + LINE))
                where[part, k, label] = (xj, top + y + LINE)
            pen.multiline_text((x, y + LINE + side + GAP), "\n".join(text), fill=(230, 230, 230),
                               font=font)
        bands.append(sheet)
    picture = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)))
    for k, band in enumerate(bands):
        picture.paste(band, (0, sum(b.height for b in bands[:k])))
    save_atomic(path, lambda f: picture.save(f, format="PNG"))
    return where


def save_atomic(path, write):
    """write(file) into path's folder under a temporary name, then rename: a reader never sees half
    a file, and a failed write leaves the old one as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- the evaluation

@lru_cache(maxsize=4)
def eval_sets(world, split, n, n_t2i, n_edit):
    """The samples to score: VQA, T2I prompts (as many of each of the seven families) and edits;
    cached, since the chance rows score the same ones (nothing changes them)."""
    mk = lambda task, i: synth.make_sample(world, task, split, i)
    per_family, prompts, quota, i = max(1, n_t2i // len(synth.T2I_FAMILIES)), [], Counter(), 0
    while len(prompts) < per_family * len(synth.T2I_FAMILIES):
        s = mk("t2i", i)
        if quota[s["family"]] < per_family:
            quota[s["family"]] += 1
            prompts.append(s)
        i += 1
    return ([mk("vqa", i) for i in range(n)], prompts,
            [mk("edit", i) for i in range(n_edit)], [mk("uniedit", i) for i in range(n_edit)])


def score(say, make, world, vqa, prompts, edits, uniedits, samples_per_prompt, seen, shown, bar):
    """Every item's record: answers from say(questions), images from make(samples, keys); either
    returns None for a part it does not do (a baseline). The first `shown` outputs of each image
    part come back too, for the picture."""
    recs, gallery = [], defaultdict(list)
    probes = [{"text": s["probe"]["question"], "image": s["image"], "answer": s["probe"]["answer"],
               "program": s["probe"]["program"]} for s in uniedits]
    said = say(vqa + probes)
    bar.update(len(vqa) + len(probes))
    if said is not None:
        for s, a in zip(vqa, said):
            recs.append({"part": "vqa", "index": s["index"], "family": s["family"],
                         "hops": s["hops"], "text": s["text"], "said": a, "truth": s["answer"],
                         "correct": a == s["answer"]})
        said = said[len(vqa):]

    draws = [(s, k) for s in prompts for k in range(samples_per_prompt)]
    for i in range(0, len(draws), BATCH):
        part = draws[i:i + BATCH]
        images = make([s for s, _ in part], [(s["id"], k) for s, k in part])
        bar.update(len(part))
        if images is None:
            continue
        for (s, k), im in zip(part, images):
            j = judge_t2i(im, s, world)
            recs.append({"part": "scene" if s["family"] == "scene" else "t2i",
                         "index": s["index"], "k": k, "family": s["family"], **j})
            if k == 0 and len(gallery["t2i"]) < shown:
                verdict = f"strict {yes(j['strict'])}, GenEval {yes(j['geneval'])}"
                gallery["t2i"].append((s, im, verdict))

    for name, samples in (("simple", edits), ("intelligent", uniedits)):
        for i in range(0, len(samples), BATCH):
            part = samples[i:i + BATCH]
            images = make(part, [(s["id"], 0) for s in part])
            bar.update(len(part))
            if images is None:
                continue
            for j, (s, im) in enumerate(zip(part, images)):
                scene = synth.parse(im, world)
                rec = {"part": name, "index": s["index"], "family": s["family"],
                       "level": f"L{s['level']}", **judge_edit(im, s, world, scene)}
                verdict = f"success {yes(rec['success'])}, following {rec['following']:.2f}, " \
                          f"preservation {rec['preservation']:.2f}"
                if name == "intelligent":
                    a = None if said is None else said[i + j]
                    rec["unseen"] = s["text"] not in seen
                    rec["probe_correct"] = None if a is None else a == s["probe"]["answer"]
                    rec["self_consistent"] = None if a is None else \
                        self_consistent(im, s, a, world, scene)
                    if a is not None:
                        verdict += f"; probe: {a!r} ({s['probe']['answer']!r})"
                recs.append(rec)
                if len(gallery[name]) < shown:
                    gallery[name].append((s, im, verdict))
    return recs, gallery


def yes(b):
    return "-" if b is None else "yes" if b else "no"


def evaluate(model, tok, world, split="val", n=1000, n_t2i=112, samples_per_prompt=4, n_edit=200,
             seed=0, device="cpu", sampling=None, rank=0, world_size=1, progress=True,
             seen=frozenset(), chance=True, picture=None):
    """Score `model` (a UMM, or a Baseline with tok None) on `split` of `world`: understanding on n
    questions, generation on n_t2i prompts x samples_per_prompt images, editing on n_edit simple and
    n_edit intelligent edits. Under torchrun each rank takes every world_size-th sample and the
    records are gathered, so every rank returns the same dict (see summarize); `chance` adds the
    chance rows' headline numbers on the same sets; `picture`: a PNG path for a labelled picture
    of the first outputs (rank 0). `seen`: a tuning set's instructions, left out of "unseen"."""
    sampling = sampling or Sampling()
    world = synth.get_world(world)
    sets = eval_sets(world, split, n, n_t2i, n_edit)
    counts = {"split": split, "seed": seed, "vqa": n, "t2i_prompts": len(sets[1]),
              "samples_per_prompt": samples_per_prompt, "simple_edits": n_edit,
              "intelligent_edits": n_edit}
    if isinstance(model, Baseline):
        say, make = model.answer, model.draw
    else:
        model.eval()
        say = lambda qs: answer(model, tok, qs, device)
        make = lambda ss, ks: draw(model, tok, ss, ks, sampling, seed, device)
    vqa, prompts, edits, uniedits = (x[rank::world_size] for x in sets)
    bar = tqdm(total=len(vqa) + 2 * len(uniedits) + len(prompts) * samples_per_prompt + len(edits),
               desc=f"eval {split}", unit="sample", disable=not progress or rank != 0, leave=False,
               dynamic_ncols=True)
    recs, gallery = score(say, make, world, vqa, prompts, edits, uniedits, samples_per_prompt, seen,
                          8 if picture else 0, bar)
    bar.close()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, recs)
        recs = [r for g in gathered for r in g]
    recs.sort(key=lambda r: (r["part"], r["index"], r.get("k", 0)))  # one order, however sharded
    out = {**summarize(recs, counts), "sampling": asdict(sampling)}
    if chance:
        out["chance"] = chance_rows(world, split, n, n_t2i, samples_per_prompt, n_edit, seed, seen)
    if picture and rank == 0 and any(gallery.values()):
        draw_picture(gallery, picture)
    return out


@lru_cache(maxsize=None)
def chance_rows(world, split, n, n_t2i, samples_per_prompt, n_edit, seed, seen):
    """{baseline: {metric: value}} on the same sets (deterministic, so cached)."""
    rows = {}
    for name in BASELINES:
        r = evaluate(Baseline(name, world, seed), None, world, split, n, n_t2i, samples_per_prompt,
                     n_edit, seed, progress=False, seen=seen, chance=False)
        rows[name] = {k: v["value"] for k, v in r["metrics"].items()}
    return rows


# ----------------------------------------------------------------------------- linear probe

@torch.no_grad()
def semantic_features(model, images, device):
    """The semantic tokens the trunk reads, (B, N, C) float, of uint8 images (B, S, S, 3)."""
    x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.cat([model.semantic_tokens(x[i:i + BATCH].to(device)).float().cpu()
                      for i in range(0, len(x), BATCH)])


def linear_probe(model, world, split="val", n_train=1000, n_test=500, device="cpu"):
    """Linear probes of the semantic tokens: is a failure perception (the attribute cannot be read
    off the tokens the trunk sees) or reasoning (it can, and the trunk does not use it)? For each
    attribute a softmax classifier on single tokens, fitted (L-BFGS, a little L2) on the cells of
    n_train train VQA images, scored on the occupied cells of n_test `split` images. Returns
    {attribute: accuracy}."""
    def cells(split, n):
        samples = [synth.make_sample(world, "vqa", split, i) for i in range(n)]
        x = semantic_features(model, [s["image"] for s in samples], device).flatten(0, 1)
        y = torch.stack([cell_labels(s["scene"], model.cfg) for s in samples]).flatten(0, 1)
        return x, y  # (n N, C), (n N, 3)

    x, y = cells("train", n_train)
    x_test, y_test = cells(split, n_test)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    occupied = y_test[:, 0] > 0
    out = {}
    for i, (attr, classes) in enumerate(zip(synth.ATTRS, CELL_CLASSES)):
        w = torch.zeros(x.shape[1] + 1, classes, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w[:-1] + w[-1], y[:, i]) + 1e-4 * w[:-1].pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            pred = (x_test @ w[:-1] + w[-1]).argmax(-1)
        out[attr] = float((pred == y_test[:, i])[occupied].float().mean())
    return out


# ----------------------------------------------------------------------------- placement probe

PLACEMENT_TIMES = (1.0, 0.9, 0.75, 0.5)


def placement_sets(world, split, n):
    """n full-scene captions and n add edits of a split: both name the cell of what to draw.
    Returns {name: (samples, cells to name (B, cells^2) bool)}: for a caption every object's
    cell, for an add only the added object's (the one cell the instruction decides)."""
    def first(task, family):
        out, i = [], 0
        while len(out) < n:
            s = synth.make_sample(world, task, split, i)
            out += [s] if s["family"] == family else []
            i += 1
        return out

    g = synth.get_world(world).grid

    def cells(objs):  # objects [shape, color, size, row, col] -> (cells^2,) bool
        m = torch.zeros(g * g, dtype=torch.bool)
        m[[r * g + c for *_, r, c in objs]] = True
        return m

    scenes, adds = first("t2i", "scene"), first("edit", "add")
    return {"scene": (scenes, torch.stack([cells(s["target_scene"]) for s in scenes])),
            "add": (adds, torch.stack([cells([o for o in s["target_scene"] if o not in s["scene"]])
                                       for s in adds]))}


@torch.no_grad()
def cells_named(model, group, batch, x_t, t, keep_sem=None, keep_pix=None):
    """What the gen_cells head names at every noisy patch, (B, N, 3) classes (0 = empty): the trunk
    run on noisy patches x_t (B, N, 3 p p) at time t, text kept, each source condition as given
    ((B,) bool; default kept)."""
    on = torch.ones(x_t.shape[0], dtype=torch.bool, device=x_t.device)
    keep_sem, keep_pix = (on if k is None else k for k in (keep_sem, keep_pix))
    h = model.velocity_patches(group, batch, x_t, torch.full_like(on, t, dtype=torch.float), on,
                               keep_sem, keep_pix)[2]  # the trunk's outputs (B, T, C)
    logits = model.gen_cells(h[:, model.layouts[group].noisy]).float()
    return torch.stack([lg.argmax(-1) for lg in logits.split(CELL_CLASSES, -1)], -1)


@torch.no_grad()
def placement_probe(model, tokenizer, world, split="val", n=200, device="cpu"):
    """Does the trunk know where a caption's objects go before it draws them? The gen_cells head
    (trained with the model) names each cell of the target from the trunk's outputs at the noisy
    image; here the noisy image is the target noised to time t, every condition kept. At t = 1 it
    is pure noise, so the cells named come from the text (and an edit's source) alone. Per set of
    placement_sets and t: occupancy (the share of all cells rightly called empty or not), objects
    (the share of the cells to name whose shape, colour and size are all right) and scenes (every
    cell right); 'chance' is calling every cell empty (objects 0). None if gen_cells is untrained."""
    cfg = model.cfg
    if cfg.gen_cell_weight <= 0:
        return None
    k = cfg.image_size // cfg.patch // cfg.cells  # patches per cell side
    g = cfg.image_size // cfg.patch
    first = [r * k * g + c * k for r in range(cfg.cells) for c in range(cfg.cells)]  # a cell's patch
    out = {}
    for name, (samples, named) in placement_sets(world, split, n).items():
        group = TASK_GROUP[samples[0]["task"]]  # t2i or edit
        batch = {key: v.to(device) for key, v in collate(samples, cfg, tokenizer)[group].items()}
        truth = batch["target_cells"][:, first].cpu()  # (B, cells^2, 3), 0 = empty
        x0 = patchify(batch["target"], cfg.patch)
        gen = torch.Generator(device).manual_seed(0)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        rows = {}
        for t in PLACEMENT_TIMES:
            pred = cells_named(model, group, batch, (1 - t) * x0 + t * eps, t)[:, first].cpu()
            right = (pred == truth).all(-1)  # (B, cells^2)
            rows[str(t)] = {"occupancy": float(((pred[..., 0] > 0) == (truth[..., 0] > 0))
                                               .float().mean()),
                            "objects": float(right[named].float().mean()),
                            "scenes": float(right.all(-1).float().mean())}
        out[name] = {"n": len(samples), "chance": float((truth[..., 0] == 0).float().mean()),
                     "by_t": rows}
    return out


# ----------------------------------------------------------------------------- tables

def num(x):
    return "-" if x is None else f"{x:.3f}"


def to_markdown(r, title="nanoUMM eval"):
    c, m = r["counts"], r["metrics"]
    chance = r.get("chance", {})
    sampling = ", ".join(f"{k} {v}" for k, v in r["sampling"].items())
    lines = [f"## {title}", "",
             f"split {c['split']}, seed {c['seed']}; {c['vqa']} questions, {c['t2i_prompts']} "
             f"prompts x {c['samples_per_prompt']} images, {c['simple_edits']} simple + "
             f"{c['intelligent_edits']} intelligent edits; sampling {sampling}; 95% bootstrap "
             "intervals; chance rows on the same sets (eval.py --baseline NAME)", "",
             "| metric | value | 95% interval | " + " | ".join(chance) + " |",
             "| --- | --- | --- |" + " --- |" * len(chance)]
    for k, (label, _, _) in METRICS.items():
        ci = f"{m[k]['ci'][0]:.3f} - {m[k]['ci'][1]:.3f}" if m[k]["ci"] else "-"
        rows = " | ".join(num(row[k]) for row in chance.values())
        lines.append(f"| {label} | {num(m[k]['value'])} | {ci} | {rows} |")
    u, g, e = r["understanding"], r["generation"], r["editing"]
    if u["by_family"]:
        lines += ["", "| VQA | n | accuracy |", "| --- | --- | --- |"]
        rows = list(u["by_family"].items()) + [(f"{k} hops", v) for k, v in u["by_hops"].items()]
        lines += [f"| {k} | {v['n']} | {num(v['correct'])} |" for k, v in rows]
    if g["by_category"]:
        lines += ["", "| ShapeEval category | prompts | strict | GenEval's rule |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['n']} | {num(v['strict'])} | {num(v['geneval'])} |"
                  for k, v in g["by_category"].items()]
    if e["simple"]["by_family"] or e["intelligent"]["by_family"]:
        fields = ("success", "following", "preservation", "overall", "pixel_l1")
        lines += ["", "| edits | group | n | success | following | preservation | overall | "
                  "pixel L1 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("simple", "intelligent"):
            groups = list(e[name]["by_family"].items()) + list(e[name]["by_level"].items())
            lines += [f"| {name} | {k} | {v['n']} | " + " | ".join(num(v[f]) for f in fields) + " |"
                      for k, v in groups]
    if r.get("linear_probe"):
        lines += ["", "Linear probe of the semantic tokens (occupied cells; eval.linear_probe): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["linear_probe"].items())]
    if r.get("placement_probe"):
        lines += ["", "| placement probe (eval.placement_probe): cells named from noise at t | "
                  + " | ".join(f"t = {t}" for t in PLACEMENT_TIMES) + " | chance |",
                  "| --- |" + " --- |" * (len(PLACEMENT_TIMES) + 1)]
        for name, p in r["placement_probe"].items():
            for field, chance in (("objects", 0.0), ("scenes", 0.0), ("occupancy", p["chance"])):
                lines.append(f"| {name} ({p['n']}): {field} | " + " | ".join(
                    f"{p['by_t'][str(t)][field]:.3f}" for t in PLACEMENT_TIMES) + f" | {chance:.3f} |")
    if r.get("cell_errors"):
        lines += ["", "| wrong cells per image | " + " | ".join(ERRORS) + " |",
                  "| --- |" + " --- |" * len(ERRORS)]
        lines += [f"| {part} | " + " | ".join(f"{e[k]:.2f}" for k in ERRORS) + " |"
                  for part, e in r["cell_errors"].items()]
    if r["consistency"]:
        t = r["consistency"]
        lines += ["", "| intelligent edits | edit right | edit wrong |", "| --- | --- | --- |"]
        lines += [f"| probe {p} | {t[f'probe {p} / edit right']} | {t[f'probe {p} / edit wrong']} |"
                  for p in ("right", "wrong")]
    if u["examples"]:
        lines += ["", "| question | model's answer | truth |", "| --- | --- | --- |"]
        lines += [f"| {x['text']} | {x['said']} | {x['truth']} |" for x in u["examples"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- --compare

def tuning_texts(folder):
    """The instruction texts of a dataset folder's train split."""
    ds = synth.Dataset(folder)  # a clear error if it is not a complete synth.py dataset
    return frozenset(r["text"] for r in ds.records() if r["split"] == "train")


# (column, split, metric) of the comparison table, the shape of the Uni-Edit paper's
COLUMNS = [("VQA acc val", "val", "vqa_acc"), ("VQA acc test_ood", "test_ood", "vqa_acc"),
           ("ShapeEval-strict val", "val", "shapeeval"),
           ("ShapeEval GenEval-rule val", "val", "shapeeval_geneval"),
           ("simple-edit success val", "val", "edit_success"),
           ("simple-edit overall val", "val", "edit_overall"),
           ("intelligent-edit success val", "val", "uniedit_success"),
           ("intelligent-edit overall val", "val", "uniedit_overall"),
           ("intelligent-edit success test_ood", "test_ood", "uniedit_success"),
           ("intelligent, unseen instructions, success val", "val", "uniedit_unseen_success"),
           ("self-consistency val", "val", "self_consistency")]


def read_result(path):
    """An eval.json, or a one-line error naming it."""
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: run eval.py --out {path}")
    try:
        with open(path) as f:
            r = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): re-run eval.py "
                         f"--out {path}") from None
    for key in ("counts", "metrics", "items"):
        if not isinstance(r, dict) or key not in r:
            raise ValueError(f"{path} has no {key!r}: not an eval.json of this eval.py (re-run "
                             f"eval.py --out {path})")
    return r


def compare(folder, rows):
    """Markdown: mean ± std over seeds of folder/<row>_s<seed>/eval_<split>.json for each row, the
    chance rows of the same sets, and each row's paired bootstrap difference from the first."""
    if not os.path.isdir(folder):
        raise ValueError(f"--compare folder {folder} does not exist")
    runs, results = {}, {}
    for row in rows:  # a row may sit in a subfolder: "unitoken/continuous"
        sub, _, name = row.rpartition("/")
        where = os.path.join(folder, sub) if sub else folder
        if os.path.isfile(os.path.join(folder, row, "eval_val.json")):  # <row> itself: one run
            runs[row] = [row]
        else:  # its seeds, <row>_s<seed>
            names = sorted(os.listdir(where)) if os.path.isdir(where) else []
            seeded = [d.rpartition("_s") for d in names]
            runs[row] = [os.path.join(sub, f"{r}_s{seed}") for r, _, seed in seeded
                         if r == name and seed.isdigit()]
        if not runs[row]:
            raise ValueError(f"no {name}_s<seed> folders and no {name} folder in {where}")
    first = runs[rows[0]][0]
    # test_ood's columns when the first row has it (a val-only sweep leaves them "-")
    splits = [s for s in ("val", "test_ood")
              if s == "val" or os.path.exists(os.path.join(folder, first, f"eval_{s}.json"))]
    for run in [r for row in rows for r in runs[row]]:
        for split in splits:
            results[run, split] = read_result(os.path.join(folder, run, f"eval_{split}.json"))
    for (run, split), r in results.items():  # paired differences need the very same items
        same = results[first, split]["counts"]
        if r["counts"] | {"seed": 0} != same | {"seed": 0}:
            raise ValueError(f"{folder}/{run}/eval_{split}.json was scored on other sets than "
                             f"{folder}/{first}: {r['counts']} vs {same}")
    head = "| model | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 2) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for _, split, key in COLUMNS:
            vals = ([results[run, split]["metrics"][key]["value"] for run in runs[row]]
                    if split in splits else [])
            vals = [v for v in vals if v is not None]
            sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
            cells.append(f"{np.mean(vals):.3f}{sd}" if vals else "-")
        lines.append(f"| {row} | {len(runs[row])} | " + " | ".join(cells) + " |")
    for name in results[first, "val"].get("chance", {}):
        cells = [num(results[first, split].get("chance", {}).get(name, {}).get(key))
                 if split in splits else "-" for _, split, key in COLUMNS]
        lines.append(f"| chance: {name} | - | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        lines += ["", f"Difference from {rows[0]}, paired bootstrap 95% interval over the same "
                  "items and seeds (* : excludes 0):", "", head, rule]
        for row in rows[1:]:
            cells = [paired_difference(results, runs[rows[0]], runs[row], split, key)
                     if split in splits else "-" for _, split, key in COLUMNS]
            lines.append(f"| {row} | {len(runs[row])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_difference(results, runs_a, runs_b, split, key):
    """'+d [lo, hi]' for mean over b's seeds minus mean over a's: items resampled the same for
    every run, seeds resampled together when both rows have the same seeds (else each row's own)."""
    part = METRICS[key][1]
    n = len(results[runs_a[0], split]["items"].get(part, {}).get("index", []))
    if n == 0:
        return "-"
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, (RESAMPLES, n))
    seeds = lambda runs: [r.rpartition("_s")[2] for r in runs]
    sa = rng.integers(0, len(runs_a), (RESAMPLES, len(runs_a)))
    sb = rng.integers(0, len(runs_b), (RESAMPLES, len(runs_b)))
    if seeds(runs_a) == seeds(runs_b):  # the same seeds: resample them together, paired
        sb = sa

    def row(runs, s):  # (point value, (RESAMPLES,) resampled values) of a row's mean over seeds
        per_run = np.stack([statistic(key, results[r, split]["items"], idx) for r in runs])
        point = np.mean([statistic(key, results[r, split]["items"])[0] for r in runs])
        return point, per_run[s, np.arange(RESAMPLES)[:, None]].mean(1)
    (pa, ra), (pb, rb) = row(runs_a, sa), row(runs_b, sb)
    diff = rb - ra
    diff = diff[np.isfinite(diff)]
    if not np.isfinite(pb - pa) or not len(diff):
        return "-"
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return f"{pb - pa:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("*" if lo > 0 or hi < 0 else "")


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Score a nanoUMM checkpoint (see the docstring).")
    p.add_argument("--ckpt", help="a step_NNNNNN folder, or a run folder (its newest checkpoint)")
    p.add_argument("--baseline", help="instead of a checkpoint, a chance row: one of "
                   + ", ".join(BASELINES))
    p.add_argument("--world", default="tiny", help="--baseline's world")
    p.add_argument("--compare", metavar="FOLDER", help="instead of scoring: print the table, "
                   "mean ± std over seeds, of FOLDER/<row>_s<seed>/eval_{val,test_ood}.json "
                   "for --rows; a FOLDER/<row> holding eval_val.json is one run instead")
    p.add_argument("--rows", default="base,simple_edit,mixed,uniedit",
                   help="--compare's rows, comma-separated; a row may name a subfolder "
                   "of FOLDER, e.g. unitoken/continuous")
    p.add_argument("--weights", default="ema", help="ema (default) or model (the raw weights)")
    p.add_argument("--split", default="val", choices=("val", "test", "test_ood", "train"))
    p.add_argument("--n", type=int, default=1000, help="VQA questions")
    p.add_argument("--n_t2i", type=int, default=112, help="T2I prompts, as many per family (7)")
    p.add_argument("--samples_per_prompt", type=int, default=4)
    p.add_argument("--n_edit", type=int, default=200, help="simple edits, as many intelligent ones")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    p.add_argument("--unseen_from", default="", help="a synth.py dataset folder (the tuning set): "
                   "intelligent edits whose instruction is in its train split are not unseen")
    p.add_argument("--out", help="results JSON (eval.md and eval.png beside it); default in the "
                   "checkpoint folder, or out/chance/NAME/ for --baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in asdict(Sampling()).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("eval.py runs as one process: start it with python, not torchrun "
                             "(train.py's eval during training splits its sets over the ranks)")
        if a.compare:
            print(compare(a.compare, a.rows.split(",")), end="")
            return
        if (a.ckpt is None) == (a.baseline is None):
            raise ValueError("pass --ckpt CHECKPOINT or --baseline NAME (or --compare FOLDER)")
        if a.baseline is not None and a.baseline not in BASELINES:
            raise ValueError(f"unknown --baseline {a.baseline!r}: choose one of "
                             f"{', '.join(BASELINES)}")
        for k in ("n", "n_t2i", "samples_per_prompt", "n_edit"):
            if getattr(a, k) < 1:
                raise ValueError(f"--{k} must be at least 1, got {getattr(a, k)}")
        sampling = Sampling(**{k: getattr(a, k) for k in asdict(Sampling())})
        seen = tuning_texts(a.unseen_from) if a.unseen_from else frozenset()
        name = "eval.json" if a.split == "val" else f"eval_{a.split}.json"
        if a.baseline:
            world = synth.get_world(a.world)
            model, tok, step = Baseline(a.baseline, world, a.seed), None, None
            ckpt = f"baseline {a.baseline}"
            out = a.out or os.path.join("out", "chance", a.baseline, name)
        else:
            model, tok, world, ckpt, meta = load(a.ckpt, a.weights, a.device)
            step = meta.get("step")
            out = a.out or os.path.join(ckpt, name)
        stem = os.path.splitext(out)[0]
        for path in (out, stem + ".md", stem + ".png"):  # before any compute, not after it
            synth.check_writable(path, "results file")
        r = evaluate(model, tok, world, a.split, a.n, a.n_t2i, a.samples_per_prompt, a.n_edit,
                     a.seed, a.device, sampling, seen=seen, picture=stem + ".png")
        if not a.baseline:
            r["linear_probe"] = linear_probe(model, world, a.split, device=a.device)
            r["placement_probe"] = placement_probe(model, tok, world, a.split, a.n_edit, a.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    r = {"checkpoint": ckpt, "step": step, "weights": None if a.baseline else a.weights,
         "unseen_from": a.unseen_from, **r}
    what = ckpt if a.baseline else f"{ckpt} (step {step}, {a.weights} weights)"
    md = to_markdown(r, f"nanoUMM eval: {what}")
    save_atomic(out, lambda f: f.write(json.dumps(r, indent=1).encode()))
    save_atomic(stem + ".md", lambda f: f.write(md.encode()))
    print(md)
    drew = any(part in r["items"] for part in ("t2i", "scene", "simple", "intelligent"))
    print(f"wrote {out} and {stem}.md" + (f" and {stem}.png" if drew else ""))


if __name__ == "__main__":
    main()
