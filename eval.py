"""Score a nanoUMM checkpoint on understanding, generation and editing, with synth.parse as the judge.

    python eval.py --ckpt out/pretrain                      # newest checkpoint of a run, EMA weights, val split
    python eval.py --ckpt out/pretrain/step_002400 --split test_ood --out results/ood.json
    python eval.py --ckpt out/pretrain --weights model --n 2000 --seed 1
    python eval.py --compare results --rows base,uniedit    # mean ± std over seeds of saved results
    python eval.py -h                                       # every count and sampling knob

The sets are synth.make_sample(world, task, split, i) with data seed 0, so every checkpoint of a
world sees the same questions, prompts and edits; --seed only seeds the sampling noise, drawn per
sample (a pure function of seed, sample id and draw), so neither the batch size nor the number of
ranks changes which noise an image starts from.

  understanding  exact-match VQA accuracy overall, per family and per hop depth, next to a blind
                 baseline: the majority answer to the same question text among 20,000 train
                 questions (the family's majority where the text never occurs in train)
  generation     ShapeEval, GenEval's rule: an image is right iff it parses cleanly and every
                 include/exclude clause of its prompt holds; accuracy per category, overall = the
                 mean of the six categories; several images per prompt; for full-scene captions,
                 object-level precision / recall / F1 of the parsed objects against the prompt's
                 "at" clauses (a malformed cell counts as a wrong object)
  editing        simple (synth task "edit") and intelligent ("uniedit") separately, by comparing
                 the grid cell by cell (a cell holds an object (shape, color, size), nothing, or a
                 malformed blob):
                   success       the output parses to exactly the target scene
                   recall        of the cells that should change (source != target there), the
                                 share whose output equals the target ("following")
                   precision     of the cells the output changed (output != source), the share
                                 that equal the target
                   preservation  of the objects that should stay (source == target there), the
                                 share unchanged in the output
                   pixel L1      mean |output - target| / 255 over the pixels of should-stay cells
                   overall       sqrt(recall x preservation) (GEdit's geometric mean)
                 Counts are pooled over the samples of a group, and an empty ratio (0 / 0) is 1: a
                 no-op edit has nothing to follow, so following is vacuously perfect and success
                 means leaving the scene as it was. Broken down by family and by logic level.
                 consistency (intelligent edits): the share of samples where the edit succeeds
                 exactly when the model answers the edit's embedded probe question right.
                 unseen (intelligent edits): the same numbers over the edits whose instruction text
                 is not in the train split of --unseen_from (a tuning set), so that no tuned model
                 can have met the sentence before (all of them without --unseen_from).

Writes every number to eval.json (or --out) and the tables, which it also prints, to eval.md
beside it; the default --out is CHECKPOINT/eval.json for val and CHECKPOINT/eval_<split>.json
otherwise. train.py calls evaluate() at each eval with small counts.

Measured on the 2-core CPU (fp32), default counts, a tiny-preset checkpoint (step 1800 of python train.py),
while two other training processes kept both cores busy:
    OMP_NUM_THREADS=1 python eval.py --ckpt out/pretrain      2 min 06 s
    python eval.py --ckpt out/pretrain                        9 min 01 s, the same numbers
With its cores taken, torch's second thread waits for a busy core at every op, so on a shared machine
run with OMP_NUM_THREADS=1. python -m pytest tests/test_eval.py tests/test_sample.py -q: 15 s.
"""
import argparse
import json
import math
import operator
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache, reduce

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import synth
from model import EOS, TASK_GROUP, collate, euler, load_checkpoint, newest_checkpoint

GENEVAL = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # t2i "scene" is apart
BATCH = 64  # samples per forward pass


@dataclass
class Sampling:
    steps: int = 20  # Euler steps from noise to image
    shift: float = 1.0  # timestep shift s >= 1; 32-64 px images need none
    cfg: float = 2.0  # text guidance scale for T2I
    cfg_img: float = 1.5  # edit guidance: source image scale ...
    cfg_txt: float = 2.0  # ... and instruction scale (Ovis-U1's dual guidance)

    def __post_init__(self):
        if self.steps < 1 or not 1 <= self.shift < math.inf:
            raise ValueError(f"sampling needs steps >= 1 and shift >= 1, got steps={self.steps}, shift={self.shift}")
        for key in ("cfg", "cfg_img", "cfg_txt"):
            scale = getattr(self, key)
            if not 0 <= scale < math.inf:  # NaN fails too: it made every image black
                raise ValueError(f"--{key}={scale} is out of range: a guidance scale is >= 0")


# ----------------------------------------------------------------------------- loading and inference
# Shared with sample.py: every model call of both scripts goes through these helpers.

def world_of(meta):
    """The synth World a checkpoint was trained on, from its config.json (lists back to tuples)."""
    w = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
         for k, v in meta["world"].items()}
    return synth.World(**w)


def load(ckpt, weights="ema", device="cpu"):
    """(model, tokenizer, world, checkpoint folder, meta); a run folder means its newest checkpoint."""
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    model, tok, meta = load_checkpoint(ckpt, weights, device)
    world = world_of(meta)
    if world.size != model.cfg.image_size:
        raise ValueError(f"checkpoint {ckpt}: world {world.name!r} is {world.size} px but the model takes "
                         f"{model.cfg.image_size} px")
    return model, tok, world, newest_checkpoint(ckpt), meta


def to_uint8(x):
    """(B, 3, S, S) in [-1, 1] -> uint8 (B, S, S, 3), the renderer's format."""
    return ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def on(device, sub):
    return {k: v.to(device) for k, v in sub.items()}


@torch.no_grad()
def answer(model, tok, questions, device="cpu"):
    """Greedy answers (str) to vqa-shaped dicts {"task": "vqa", "text", "image"}, one forward per BATCH."""
    out = []
    for i in range(0, len(questions), BATCH):
        part = [{**q, "task": "vqa", "answer": None} for q in questions[i:i + BATCH]]
        for ids in model.generate_text(on(device, collate(part, model.cfg, tok)["vqa"])).tolist():
            out.append(tok.decode(ids[:ids.index(EOS)] if EOS in ids else ids).strip())
    return out


def noise(key, seed, size):
    """The starting noise (3, S, S) of one image: a pure function of (seed, key), independent of batching."""
    g = torch.Generator().manual_seed(synth.sample_seed("noise", seed, key))
    return torch.randn(3, size, size, generator=g)


@torch.no_grad()
def draw(model, tok, samples, keys, sampling, seed=0, device="cpu"):
    """Images (uint8 (B, S, S, 3)) for t2i prompts or edits (a source "image" and an instruction "text"),
    all of one task group; keys name each image's noise, so a prompt drawn 4 times has 4 keys."""
    task = TASK_GROUP[samples[0]["task"]]
    sub = on(device, collate([{**s, "target": None} for s in samples], model.cfg, tok)[task])
    x = torch.stack([noise(k, seed, model.cfg.image_size) for k in keys]).to(device)  # (B, 3, S, S)
    txt, img = (sampling.cfg, 1.0) if task == "t2i" else (sampling.cfg_txt, sampling.cfg_img)
    if (txt, img) == (1.0, 1.0):  # guidance at scale 1 is the conditional velocity: one pass, not two or three
        fn = lambda x_t, t: model.velocity(task, sub, x_t, t)
    else:
        fn = lambda x_t, t: model.guided_velocity(task, sub, x_t, t, txt, img)
    return to_uint8(euler(fn, x, sampling.steps, sampling.shift).clamp(-1, 1))


# ----------------------------------------------------------------------------- judging one image

MALFORMED = "malformed"  # what a cell the parser could not read holds: it equals no object


def cell_map(scene):
    """Scene (or list of [shape, color, size, row, col]) -> {(row, col): (shape, color, size) or MALFORMED}."""
    if not isinstance(scene, synth.Scene):
        scene = synth.Scene.of(scene)
    cells = {(o.row, o.col): tuple(o[:3]) for o in scene.objects}
    cells.update({tuple(c): MALFORMED for c in scene.malformed})
    return cells


def judge_t2i(image, sample, world):
    """GenEval's verdict on one generated image, plus object counts for full-scene captions."""
    scene = synth.parse(image, world)
    wanted = {tuple(c[2]): tuple(c[1]) for c in sample["clauses"] if c[0] == "at"}
    got = cell_map(scene)
    return {"correct": synth.satisfies(scene, sample["clauses"]),
            "tp": sum(got.get(cell) == obj for cell, obj in wanted.items()), "pred": len(got), "truth": len(wanted)}


def judge_edit(image, sample, world):
    """Counts for one edited image against its sample's source and target (see the module docstring)."""
    out, src, tgt = cell_map(synth.parse(image, world)), cell_map(sample["scene"]), cell_map(sample["target_scene"])
    cells = [(r, c) for r in range(world.grid) for c in range(world.grid)]
    change = [x for x in cells if src.get(x) != tgt.get(x)]
    stay = [x for x in cells if src.get(x) == tgt.get(x)]
    stay_objects = [x for x in stay if x in src]
    mask = np.zeros((world.size, world.size), bool)  # the pixels of the should-stay cells
    for r, c in stay:
        mask[r * world.cell:(r + 1) * world.cell, c * world.cell:(c + 1) * world.cell] = True
    diff = np.abs(np.asarray(image, np.float32) - np.asarray(sample["target"], np.float32)) / 255
    return {"success": all(out.get(x) == tgt.get(x) for x in cells),
            "should_change": len(change), "followed": sum(out.get(x) == tgt.get(x) for x in change),
            "changed": sum(out.get(x) != src.get(x) for x in cells),
            "should_stay": len(stay_objects), "kept": sum(out.get(x) == src.get(x) for x in stay_objects),
            "l1_sum": float(diff[mask].sum()), "l1_n": int(mask.sum()) * 3}


# ----------------------------------------------------------------------------- pooling judgements

def ratio(a, b):
    return a / b if b else 1.0  # an empty ratio is vacuously perfect: nothing to get wrong


def edit_stats(recs):
    """Pooled editing metrics of a group of judge_edit records."""
    s = {k: sum(r[k] for r in recs) for k in ("should_change", "followed", "changed", "should_stay", "kept",
                                               "l1_sum", "l1_n")}
    recall, keep = ratio(s["followed"], s["should_change"]), ratio(s["kept"], s["should_stay"])
    return {"n": len(recs), "success": sum(r["success"] for r in recs) / max(1, len(recs)),
            "precision": ratio(s["followed"], s["changed"]), "recall": recall, "preservation": keep,
            "pixel_l1": s["l1_sum"] / s["l1_n"] if s["l1_n"] else 0.0, "overall": math.sqrt(recall * keep)}


def by(recs, key, stats):
    groups = defaultdict(list)
    for r in recs:
        groups[str(r[key])].append(r)
    return {k: stats(groups[k]) for k in sorted(groups)}


def vqa_stats(recs):
    n = len(recs)
    return {"n": n, "accuracy": sum(r["correct"] for r in recs) / max(1, n),
            "blind_accuracy": sum(r["blind_correct"] for r in recs) / max(1, n)}


def summarize(recs, counts):
    """The results dict from every sample's record (gathered from all ranks)."""
    vqa = [r for r in recs if r["part"] == "vqa"]
    t2i = [r for r in recs if r["part"] == "t2i"]
    geneval = {f: {"n": len(g), "accuracy": sum(r["correct"] for r in g) / max(1, len(g))}
               for f in GENEVAL for g in [[r for r in t2i if r["family"] == f]]}
    scene = [r for r in t2i if r["family"] == "scene"]
    tp, pred, truth = (sum(r[k] for r in scene) for k in ("tp", "pred", "truth"))
    p, rc = (tp / pred if pred else 0.0), (tp / truth if truth else 0.0)  # nothing drawn is no credit here
    out = {
        "counts": counts,
        "understanding": {**vqa_stats(vqa), "by_family": by(vqa, "family", vqa_stats),
                          "by_hops": by(vqa, "hops", vqa_stats),
                          "examples": [{k: r[k] for k in ("text", "said", "truth")} for r in vqa[:8]]},
        "generation": {"overall": sum(g["accuracy"] for g in geneval.values()) / len(geneval), "by_category": geneval,
                       "scene": {"n": len(scene), "precision": p, "recall": rc,
                                 "f1": 2 * p * rc / (p + rc) if p + rc else 0.0}},
        "editing": {},
    }
    for name, part in (("simple", "edit"), ("intelligent", "uniedit")):
        g = [r for r in recs if r["part"] == part]
        out["editing"][name] = {**edit_stats(g), "by_family": by(g, "family", edit_stats),
                                "by_level": by(g, "level", edit_stats)}
    ie = [r for r in recs if r["part"] == "uniedit"]
    out["editing"]["intelligent"]["probe_accuracy"] = sum(r["probe_correct"] for r in ie) / max(1, len(ie))
    out["editing"]["intelligent"]["consistency"] = sum(r["success"] == r["probe_correct"] for r in ie) / max(1, len(ie))
    out["editing"]["intelligent"]["unseen"] = edit_stats([r for r in ie if r["unseen"]])
    return out


# ----------------------------------------------------------------------------- the blind baseline

@lru_cache(maxsize=None)
def blind_table(world, n=20_000):
    """(majority answer per question text, majority answer per family) over n train questions."""
    per_text, per_family = defaultdict(Counter), defaultdict(Counter)
    for i in range(n):
        s = synth.make_sample(world, "vqa", "train", i)
        per_text[s["text"]][s["answer"]] += 1
        per_family[s["family"]][s["answer"]] += 1
    top = lambda table: {k: c.most_common(1)[0][0] for k, c in table.items()}
    return top(per_text), top(per_family)


def blind_answer(sample, table):
    per_text, per_family = table
    return per_text.get(sample["text"], per_family.get(sample["family"]))


# ----------------------------------------------------------------------------- the evaluation

def eval_sets(world, split, n, n_t2i, n_edit):
    """The samples to score: VQA, T2I prompts (the same number from each of the seven families) and edits."""
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


def evaluate(model, tok, world, split="val", n=500, n_t2i=112, samples_per_prompt=4, n_edit=150, seed=0,
             device="cpu", sampling=None, rank=0, world_size=1, progress=True, seen=frozenset()):
    """Score model on `split` of `world`: understanding on n questions, generation on n_t2i prompts x
    samples_per_prompt images, editing on n_edit simple and n_edit intelligent edits. Under torchrun
    each rank takes every world_size-th sample and the records are gathered, so every rank returns
    the same dict: the numbers of the module docstring plus "counts" and "sampling". `seen`: instruction
    texts of a tuning set, left out of the intelligent edits' "unseen" numbers."""
    sampling = sampling or Sampling()
    world = synth.get_world(world)
    model.eval()
    sets = eval_sets(world, split, n, n_t2i, n_edit)
    counts = {"split": split, "seed": seed, "vqa": n, "t2i_prompts": len(sets[1]),
              "samples_per_prompt": samples_per_prompt, "simple_edits": n_edit, "intelligent_edits": n_edit}
    vqa, prompts, edits, uniedits = (x[rank::world_size] for x in sets)
    draws = [(s, k) for s in prompts for k in range(samples_per_prompt)]
    probes = [{"text": s["probe"]["question"], "image": s["image"]} for s in uniedits]
    bar = tqdm(total=len(vqa) + len(probes) + len(draws) + len(edits) + len(uniedits), desc=f"eval {split}",
               unit="sample", disable=not progress or rank != 0, leave=False, dynamic_ncols=True)
    recs = []

    said = answer(model, tok, vqa + probes, device)
    bar.update(len(vqa) + len(probes))
    table = blind_table(world)
    for s, a in zip(vqa, said):
        recs.append({"part": "vqa", "index": s["index"], "family": s["family"], "hops": s["hops"], "text": s["text"],
                     "said": a, "truth": s["answer"], "correct": a == s["answer"],
                     "blind_correct": blind_answer(s, table) == s["answer"]})
    probe_right = [a == s["probe"]["answer"] for s, a in zip(uniedits, said[len(vqa):])]

    for i in range(0, len(draws), BATCH):
        part = draws[i:i + BATCH]
        images = draw(model, tok, [s for s, _ in part], [(s["id"], k) for s, k in part], sampling, seed, device)
        for (s, k), im in zip(part, images):
            recs.append({"part": "t2i", "index": s["index"], "k": k, "family": s["family"], **judge_t2i(im, s, world)})
        bar.update(len(part))

    for task, samples in (("edit", edits), ("uniedit", uniedits)):
        for i in range(0, len(samples), BATCH):
            part = samples[i:i + BATCH]
            images = draw(model, tok, part, [(s["id"], 0) for s in part], sampling, seed, device)
            for j, (s, im) in enumerate(zip(part, images)):
                rec = {"part": task, "index": s["index"], "family": s["family"], "level": f"L{s['level']}",
                       **judge_edit(im, s, world)}
                if task == "uniedit":
                    rec["probe_correct"], rec["unseen"] = probe_right[i + j], s["text"] not in seen
                recs.append(rec)
            bar.update(len(part))
    bar.close()

    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, recs)
        recs = [r for g in gathered for r in g]
    recs.sort(key=lambda r: (r["part"], r["index"], r.get("k", 0)))  # pooled sums in one order, whatever the sharding
    return {**summarize(recs, counts), "sampling": asdict(sampling)}


def headline(r):
    """The few numbers worth one log line: {name: value}."""
    u, g, e = r["understanding"], r["generation"], r["editing"]
    return {"vqa_acc": u["accuracy"], "vqa_blind": u["blind_accuracy"], "shapeeval": g["overall"],
            "scene_f1": g["scene"]["f1"], "edit_success": e["simple"]["success"],
            "edit_overall": e["simple"]["overall"],
            "uniedit_success": e["intelligent"]["success"], "uniedit_overall": e["intelligent"]["overall"],
            "consistency": e["intelligent"]["consistency"]}


# ----------------------------------------------------------------------------- the tables

def to_markdown(r, title="nanoUMM eval"):
    c, u, g, e = r["counts"], r["understanding"], r["generation"], r["editing"]
    f = lambda x: f"{x:.3f}"
    lines = [f"## {title}", "",
             f"split {c['split']}, seed {c['seed']}; {c['vqa']} questions, {c['t2i_prompts']} prompts x "
             f"{c['samples_per_prompt']} images, {c['simple_edits']} simple + {c['intelligent_edits']} intelligent "
             "edits; "
             "sampling " + ", ".join(f"{k} {v}" for k, v in r["sampling"].items()), "",
             "| capability | metric | value |", "| --- | --- | --- |",
             f"| understanding | VQA accuracy (blind baseline) | {f(u['accuracy'])} ({f(u['blind_accuracy'])}) |",
             f"| generation | ShapeEval overall (mean of 6 categories) | {f(g['overall'])} |",
             f"| generation | full-scene object F1 (P / R) | {f(g['scene']['f1'])} ({f(g['scene']['precision'])} / "
             f"{f(g['scene']['recall'])}) |"]
    for name in ("simple", "intelligent"):
        lines.append(f"| {name} editing | success / overall | {f(e[name]['success'])} / {f(e[name]['overall'])} |")
    un = e["intelligent"]["unseen"]
    lines.append(f"| intelligent editing | unseen instructions ({un['n']}): success / overall | {f(un['success'])} / "
                 f"{f(un['overall'])} |")
    lines.append(f"| intelligent editing | probe accuracy / consistency | {f(e['intelligent']['probe_accuracy'])} / "
                 f"{f(e['intelligent']['consistency'])} |")
    lines += ["", "| VQA | n | accuracy | blind |", "| --- | --- | --- | --- |"]
    rows = [(k, v) for k, v in u["by_family"].items()] + [(f"{k} hops", v) for k, v in u["by_hops"].items()]
    lines += [f"| {k} | {v['n']} | {f(v['accuracy'])} | {f(v['blind_accuracy'])} |" for k, v in rows]
    lines += ["", "| ShapeEval category | images | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['n']} | {f(v['accuracy'])} |" for k, v in g["by_category"].items()]
    lines += ["", "| edits | group | n | success | precision | recall | preservation | pixel L1 | overall |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("simple", "intelligent"):
        groups = [("all", e[name])] + list(e[name]["by_family"].items()) + list(e[name]["by_level"].items())
        lines += [f"| {name} | {k} | {v['n']} | " + " | ".join(f(v[m]) for m in
                  ("success", "precision", "recall", "preservation", "pixel_l1", "overall")) + " |" for k, v in groups]
    lines += ["", "| question | model's answer | truth |", "| --- | --- | --- |"]
    lines += [f"| {x['text']} | {x['said']} | {x['truth']} |" for x in u["examples"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def tuning_texts(folder):
    """The instruction texts of a dataset folder's train split."""
    ds = synth.Dataset(folder)  # checks the folder: a clear error if it is not a complete synth.py dataset
    return frozenset(r["text"] for r in ds.records() if r["split"] == "train")


# (column, split, path into eval.json) of the comparison table, the shape of the Uni-Edit paper's
COLUMNS = [("VQA acc val", "val", ("understanding", "accuracy")),
           ("VQA acc test_ood", "test_ood", ("understanding", "accuracy")),
           ("ShapeEval val", "val", ("generation", "overall")),
           ("simple-edit success val", "val", ("editing", "simple", "success")),
           ("simple-edit overall val", "val", ("editing", "simple", "overall")),
           ("intelligent-edit success val", "val", ("editing", "intelligent", "success")),
           ("intelligent-edit overall val", "val", ("editing", "intelligent", "overall")),
           ("intelligent-edit success test_ood", "test_ood", ("editing", "intelligent", "success")),
           ("intelligent, unseen instructions, success val", "val", ("editing", "intelligent", "unseen", "success")),
           ("consistency val", "val", ("editing", "intelligent", "consistency"))]


def compare(folder, rows):
    """Markdown table, mean ± std over seeds, of folder/<row>_s<seed>/eval_<split>.json for each row."""
    lines = ["| model | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    def result(run, split):
        f = os.path.join(folder, run, f"eval_{split}.json")
        if not os.path.exists(f):
            raise ValueError(f"{f} is missing: run eval.py --split {split} --out {f}")
        with open(f) as fh:
            return json.load(fh)

    for row in rows:
        runs = [d for d in sorted(os.listdir(folder))
                if d.rpartition("_s")[0] == row and d.rpartition("_s")[2].isdigit()]  # <row>_s<seed>
        if not runs:
            raise ValueError(f"no {row}_s<seed> folders in {folder}")
        results = [{split: result(run, split) for split in ("val", "test_ood")} for run in runs]
        cells = []
        for _, split, path in COLUMNS:
            vals = [reduce(operator.getitem, path, r[split]) for r in results]  # r[split][path[0]]...
            sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
            cells.append(f"{np.mean(vals):.3f}{sd}")
        lines.append(f"| {row} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a nanoUMM checkpoint (see the module docstring).")
    p.add_argument("--ckpt", help="a step_NNNNNN folder, or a run folder (its newest checkpoint)")
    p.add_argument("--compare", metavar="FOLDER", help="instead of scoring: print the table, mean ± std over "
                   "seeds, of FOLDER/<row>_s<seed>/eval_{val,test_ood}.json for each of --rows")
    p.add_argument("--rows", default="base,simple_edit,mixed,uniedit", help="--compare's rows, comma-separated")
    p.add_argument("--weights", default="ema", help="ema (default) or model (the raw weights)")
    p.add_argument("--split", default="val", choices=("val", "test", "test_ood", "train"))
    p.add_argument("--n", type=int, default=500, help="VQA questions")
    p.add_argument("--n_t2i", type=int, default=112, help="T2I prompts, split evenly over the 7 families")
    p.add_argument("--samples_per_prompt", type=int, default=4)
    p.add_argument("--n_edit", type=int, default=150, help="simple edits, and as many intelligent edits")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    p.add_argument("--unseen_from", default="", help="a synth.py dataset folder (the tuning set): intelligent "
                                                     "edits whose instruction is in its train split are not unseen")
    p.add_argument("--out", help="results JSON (eval.md is written beside it); default in the checkpoint folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in asdict(Sampling()).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    try:
        if a.compare:
            print(compare(a.compare, a.rows.split(",")), end="")
            return
        if not a.ckpt:
            raise ValueError("pass --ckpt CHECKPOINT (or --compare FOLDER)")
        for k in ("n", "n_t2i", "samples_per_prompt", "n_edit"):
            if getattr(a, k) < 1:
                raise ValueError(f"--{k} must be at least 1, got {getattr(a, k)}")
        sampling = Sampling(**{k: getattr(a, k) for k in asdict(Sampling())})
        seen = tuning_texts(a.unseen_from) if a.unseen_from else frozenset()
        model, tok, world, ckpt, meta = load(a.ckpt, a.weights, a.device)
        r = evaluate(model, tok, world, a.split, a.n, a.n_t2i, a.samples_per_prompt, a.n_edit, a.seed, a.device,
                     sampling, seen=seen)
    except ValueError as e:
        sys.exit(f"error: {e}")
    r = {"checkpoint": ckpt, "step": meta.get("step"), "weights": a.weights, "unseen_from": a.unseen_from, **r}
    out = a.out or os.path.join(ckpt, "eval.json" if a.split == "val" else f"eval_{a.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
    md = to_markdown(r, f"nanoUMM eval: {ckpt} (step {r['step']}, {a.weights} weights)")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")


if __name__ == "__main__":
    main()
