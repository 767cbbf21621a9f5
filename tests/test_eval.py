"""Tests of eval.py: python -m pytest tests/test_eval.py -q

The judges are tested on hand-made images (clean targets, unedited sources, blank images, clutter,
known partial edits), the chance rows on the real sets, the intervals against a hand computation;
evaluate() and the CLI run on a 2-step checkpoint of a narrow model, made once for the session."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval as ev
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = synth.get_world("tiny")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
SMALL = dict(n=8, n_t2i=7, samples_per_prompt=1, n_edit=4, sampling=ev.Sampling(steps=2))
BLANK = np.zeros((W.size, W.size, 3), np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return os.path.join(tiny_run, "step_000002")


def find(task, ok, split="val"):
    """The first sample of `task` in `split` that satisfies ok(sample)."""
    return next(s for s in (synth.make_sample(W, task, split, i) for i in range(2000)) if ok(s))


def render(objs):
    return synth.render(synth.Scene.of(objs), W)


def scribble(img, cell):
    """Paint a red/green checkerboard over a cell: the parser cannot read it (a malformed cell)."""
    img = img.copy()
    c = W.cell
    block = img[cell[0] * c:(cell[0] + 1) * c, cell[1] * c:(cell[1] + 1) * c]
    block[::2, ::2], block[1::2, 1::2] = (255, 0, 0), (0, 255, 0)
    return img


def empty_cells(scene):
    taken = {tuple(o[3:]) for o in scene}
    return [(r, c) for r in range(W.grid) for c in range(W.grid) if (r, c) not in taken]


def metrics(recs):
    return {k: v["value"] for k, v in ev.summarize(recs, {})["metrics"].items()}


def edit_recs(part, pairs):
    """Records of edits judged on (image, sample) pairs, as evaluate() makes them."""
    return [{"part": part, "index": i, "family": s["family"], "level": f"L{s['level']}",
             "unseen": True, **ev.judge_edit(im, s, W)} for i, (im, s) in enumerate(pairs)]


# ----------------------------------------------------------------------------- editing, per sample

def test_edit_judge_target_source_blank_and_clutter():
    s = find("edit", lambda s: s["family"] == "recolor" and len(s["scene"]) >= 2)
    stay = W.grid ** 2 - 1  # every cell but the recolored one, the empty ones too
    assert ev.judge_edit(s["target"], s, W) == {
        "success": True, "following": 1.0, "preservation": 1.0, "overall": 1.0, "pixel_l1": 0.0,
        "should_change": 1, "followed": 1, "should_stay": stay, "kept": stay,
        "errors": dict.fromkeys(ev.ERRORS, 0)}
    src = ev.judge_edit(s["image"], s, W)  # the source unchanged: a real edit left undone
    assert (src["success"], src["following"], src["preservation"]) == (False, 0.0, 1.0)
    assert src["overall"] == 0.0
    blank = ev.judge_edit(BLANK, s, W)  # a blank image keeps the empty cells but loses every object
    assert (blank["success"], blank["following"]) == (False, 0.0)
    assert blank["preservation"] == (stay - (len(s["scene"]) - 1)) / stay and blank["pixel_l1"] > 0
    # the clutter editor: the exact target plus an object in every empty cell
    clutter = s["target_scene"] + [["square", "white", "small", r, c]
                                   for r, c in empty_cells(s["target_scene"])]
    j = ev.judge_edit(render(clutter), s, W)
    assert not j["success"] and j["following"] == 1.0
    assert j["preservation"] == (len(s["scene"]) - 1) / stay < 1 and j["overall"] < 1
    # a malformed blob in an empty cell spoils an otherwise perfect edit, in preservation too
    blob = ev.judge_edit(scribble(s["target"], empty_cells(s["scene"])[0]), s, W)
    assert (blob["success"], blob["following"], blob["kept"]) == (False, 1.0, stay - 1)


def test_source_is_a_success_on_a_noop_edit_and_not_on_a_real_one():
    noop = find("uniedit", lambda s: not s["edit"]["atoms"])
    assert noop["scene"] == noop["target_scene"]
    assert ev.judge_edit(noop["image"], noop, W) == ev.judge_edit(noop["target"], noop, W)
    assert ev.judge_edit(noop["image"], noop, W)["success"]
    real = find("uniedit", lambda s: bool(s["edit"]["atoms"]))
    assert not ev.judge_edit(real["image"], real, W)["success"]
    # on a no-op, changing anything is not following: a blank loses following, not just preservation
    blank = ev.judge_edit(BLANK, noop, W)
    assert (blank["success"], blank["following"], blank["overall"]) == (False, 0.0, 0.0)


def test_edit_judge_known_partial_edit_and_per_sample_averaging():
    s = find("edit", lambda s: s["family"] == "swap" and len(s["scene"]) >= 4)
    src, tgt = ev.cell_map(s["scene"]), ev.cell_map(s["target_scene"])
    a, b = sorted(x for x in set(src) | set(tgt) if src.get(x) != tgt.get(x))
    stay = [o for o in s["scene"] if tuple(o[3:]) not in (a, b)]
    # only the swap's first half is done (cell b keeps its object), and one other object is lost
    out = [[*tgt[a], *a], [*src[b], *b]] + stay[1:]
    j = ev.judge_edit(render(out), s, W)
    assert (j["should_change"], j["followed"], j["should_stay"], j["kept"]) == (2, 1, 14, 13)
    assert (j["following"], j["preservation"]) == (0.5, 13 / 14)
    assert j["overall"] == pytest.approx(math.sqrt(0.5 * 13 / 14))
    # pixel L1 covers the should-stay cells only: exactly the lost object's pixels differ there
    lost = np.abs(render(stay[:1]).astype(float)).sum() / 255
    assert j["pixel_l1"] == pytest.approx(lost / (14 * W.cell ** 2 * 3))
    # GEdit's order: overall per sample, then the mean (not the root of pooled means)
    m = metrics(edit_recs("simple", [(render(out), s), (s["target"], s), (s["image"], s)]))
    assert m["edit_overall"] == pytest.approx((math.sqrt(0.5 * 13 / 14) + 1 + 0) / 3)
    assert m["edit_following"] == pytest.approx(0.5) and m["edit_success"] == pytest.approx(1 / 3)


def test_interval_of_per_sample_overall_matches_a_hand_computed_bootstrap():
    rng = np.random.default_rng(1)
    overall = rng.uniform(0, 1, 300) ** 2
    items = {"simple": {"index": list(range(300)), "overall": list(overall)}}
    got = ev.interval("edit_overall", items)
    idx = np.random.default_rng(0).integers(0, 300, (ev.RESAMPLES, 300))
    lo, hi = np.percentile(overall[idx].mean(1), [2.5, 97.5])
    assert got["value"] == pytest.approx(overall.mean()) and got["ci"] == pytest.approx([lo, hi])
    half = 1.96 * overall.std(ddof=1) / math.sqrt(300)  # and it is about the normal approximation's
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


# ----------------------------------------------------------------------------- generation

def test_strict_shapeeval_punishes_what_geneval_forgives():
    s = find("t2i", lambda s: s["family"] == "two_object")
    free = empty_cells(s["target_scene"])
    extra = ev.judge_t2i(render(s["target_scene"] + [["diamond", "red", "small", *free[0]]]), s, W)
    blob = ev.judge_t2i(scribble(s["target"], free[0]), s, W)
    right = ev.judge_t2i(s["target"], s, W)
    assert (right["strict"], right["geneval"]) == (True, True)
    assert (extra["strict"], extra["geneval"]) == (False, True)  # an extra object: GenEval's blind
    assert (blob["strict"], blob["geneval"]) == (False, True)  # nor at an unreadable blob
    assert ev.judge_t2i(BLANK, s, W)["geneval"] is False
    # counting is exact under both; colors judge the most salient object of the shape
    count = find("t2i", lambda s: s["family"] == "counting")
    shape, n = count["geneval"]["include"][0]["shape"], count["geneval"]["include"][0]["count"]
    free = empty_cells(count["target_scene"])
    one_more = count["target_scene"] + [[shape, "red", "small", *free[0]]]
    assert ev.judge_t2i(render(one_more), count, W)["geneval"] is False
    color = find("t2i", lambda s: s["family"] == "colors" and s["target_scene"][0][2] == "small"
                 and s["target_scene"][0][3:] != [3, 3])
    o = color["target_scene"][0]
    other = "white" if o[1] != "white" else "red"
    later = [c for c in empty_cells([o]) if c > tuple(o[3:])][0]  # after it in reading order
    first = render([o, [o[0], other, "large", *later]])  # the larger one is judged, not o
    after = render([o, [o[0], other, "small", *later]])  # o comes first in reading order
    assert ev.judge_t2i(first, color, W)["geneval"] is False
    assert ev.judge_t2i(after, color, W)["geneval"] is True


def test_shapeeval_is_the_mean_over_categories_and_scene_f1_counts_objects():
    fams = {f: find("t2i", lambda s, f=f: s["family"] == f) for f in synth.T2I_FAMILIES}
    # three categories right, three wrong, 2 images each; the full-scene caption: one right
    right = lambda f, k: f in ev.GENEVAL[:3] or (f == "scene" and k == 0)
    recs = [{"part": "scene" if f == "scene" else "t2i", "index": i, "k": k, "family": f,
             **ev.judge_t2i(s["target"] if right(f, k) else BLANK, s, W)}
            for i, (f, s) in enumerate(fams.items()) for k in range(2)]
    r = ev.summarize(recs, {})
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert m["shapeeval"] == m["shapeeval_geneval"] == 0.5
    assert r["generation"]["by_category"]["colors"] == {"n": 1, "strict": 0.0, "geneval": 0.0}
    n = len(fams["scene"]["target_scene"])
    assert m["scene_exact"] == 0.5 and m["scene_f1"] == pytest.approx(2 * n / (n + 2 * n))


# ----------------------------------------------------------------------------- consistency

def test_self_consistency_follows_the_models_own_answer():
    cond = find("uniedit", lambda s: s["family"] == "conditional" and s["edit"]["branch"]
                and s["probe"]["program"][1] == "color")
    other = next(c for c in W.colors if c != cond["probe"]["answer"])
    assert ev.self_consistent(cond["target"], cond, cond["probe"]["answer"], W)  # right and right
    # a wrong answer that implies no change: leaving the scene alone agrees with it, the target not
    assert ev.self_consistent(cond["image"], cond, other, W)
    assert not ev.self_consistent(cond["target"], cond, other, W)
    # a wrong answer that implies another edit: add the object in the color the model said
    synth_ = find("uniedit", lambda s: s["family"] == "synthesis"
                  and s["probe"]["program"][1] == "color")
    said = next(c for c in W.colors if c != synth_["probe"]["answer"])
    added = synth_["edit"]["atoms"][0]
    implied = synth_["scene"] + [[added["obj"][0], said, added["obj"][2], *added["cells"][0]]]
    assert ev.self_consistent(render(implied), synth_, said, W)
    assert not ev.self_consistent(synth_["target"], synth_, said, W)
    assert ev.self_consistent(synth_["target"], synth_, "7", W) is False  # no color: no edit
    # an answer decides nothing where the edit is the same whatever it is
    loc = find("uniedit", lambda s: s["family"] == "location")
    assert ev.self_consistent(loc["target"], loc, "red", W) is None


def test_the_consistency_table_cannot_be_won_by_failing():
    s = find("uniedit", lambda s: s["family"] == "conditional" and s["edit"]["branch"])
    wrong = "nothing"  # never succeed, answer every probe wrong: the old "consistency" gave 1.0
    recs = edit_recs("intelligent", [(BLANK, s)] * 4)
    for r in recs:
        r["probe_correct"], r["self_consistent"] = False, ev.self_consistent(BLANK, s, wrong, W)
    r = ev.summarize(recs, {})
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert m["self_consistency"] == 0.0 and m["edit_if_probe_wrong"] == 0.0
    assert m["edit_if_probe_right"] is None
    assert r["consistency"] == {"probe right / edit right": 0, "probe right / edit wrong": 0,
                                "probe wrong / edit right": 0, "probe wrong / edit wrong": 4}


# ----------------------------------------------------------------------------- chance rows

def chance(name, **sizes):
    return ev.evaluate(ev.Baseline(name, W), None, W, progress=False, chance=False,
                       **{**dict(n=60, n_t2i=70, samples_per_prompt=1, n_edit=60), **sizes})


def test_oracle_scores_one_on_every_metric():
    r = chance("oracle")
    for k, v in r["metrics"].items():
        if k == "edit_if_probe_wrong":
            assert v["value"] is None  # no probe is answered wrong: undefined, not 0 or 1
        elif k.endswith("pixel_l1"):
            assert v["value"] == 0.0
        else:
            assert v["value"] == 1.0 and v["ci"] == [1.0, 1.0], k


def test_trivial_models_score_near_chance():
    universal = chance("universal", n_t2i=140, samples_per_prompt=2)["metrics"]
    assert universal["shapeeval"]["value"] <= 0.1 < universal["shapeeval_geneval"]["value"]
    source = chance("source")["metrics"]
    assert source["edit_success"]["value"] == 0.0 and source["edit_preservation"]["value"] == 1.0
    assert 0 < source["uniedit_success"]["value"] < 0.3  # its no-op edits, and nothing else
    assert source["vqa_acc"]["value"] is None and source["shapeeval"]["value"] is None
    blind, rand = chance("blind")["metrics"], chance("random")["metrics"]
    assert 0.15 < rand["vqa_acc"]["value"] < blind["vqa_acc"]["value"] < 0.5
    assert blind["edit_success"]["value"] is None and rand["self_consistency"]["value"] < 0.1
    # the universal image is chosen on train prompts, once per world
    assert ev.universal_image(W) is ev.universal_image(W)


def test_blind_answers_the_majority_per_text_then_kind():
    per_text, per_kind = ev.train_answers(W)
    qs = [synth.make_sample(W, "vqa", "train", i) for i in range(3000)]
    text = max(set(q["text"] for q in qs), key=lambda t: sum(q["text"] == t for q in qs))
    question = next(q for q in qs if q["text"] == text)
    assert ev.blind_answer(question, W) == per_text[text].most_common(1)[0][0]
    unseen = {"text": "How many unseen questions are there?",
              "program": ["count", ["all", {"color": "red"}]]}
    assert ev.blind_answer(unseen, W) == per_kind["count"].most_common(1)[0][0]


# ----------------------------------------------------------------------------- evaluate(), CLI

def test_evaluate_is_deterministic_returns_every_key_and_ignores_batching(ckpt, monkeypatch,
                                                                           tmp_path):
    model, tok, world, _, _ = ev.load(ckpt)
    a = ev.evaluate(model, tok, world, progress=False, **SMALL)
    assert a == ev.evaluate(model, tok, world, progress=False, **SMALL)
    monkeypatch.setattr(ev, "BATCH", 3)  # noise is drawn per sample, so batching changes nothing
    assert a == ev.evaluate(model, tok, world, progress=False, picture=str(tmp_path / "p.png"),
                            **SMALL)
    assert set(a) == {"counts", "metrics", "understanding", "generation", "editing", "consistency",
                      "cell_errors", "items", "sampling", "chance"}
    assert set(a["metrics"]) == set(ev.METRICS) and set(a["chance"]) == set(ev.BASELINES)
    assert set(a["generation"]["by_category"]) == set(ev.GENEVAL)
    assert a["counts"]["t2i_prompts"] == 7 and len(a["items"]["simple"]["index"]) == 4
    assert len(a["items"]["vqa"]["correct"]) == 8 and set(ev.headline(a)) == set(ev.HEADLINE)
    assert "| VQA accuracy |" in ev.to_markdown(a)


def test_picture_shows_each_output_upscaled_and_labelled(tmp_path):
    s = find("edit", lambda s: True)
    out = s["target"].copy()
    out[:8] = 255
    where = ev.draw_picture({"simple": [(s, out, "success no")] * 5}, str(tmp_path / "p.png"))
    pic = np.array(Image.open(tmp_path / "p.png"))
    side = W.size * ev.SCALE
    assert side >= 96
    for label, image in (("source", s["image"]), ("output", out), ("target", s["target"])):
        x, y = where["simple", 4, label]  # the fifth sample starts the second row
        assert np.array_equal(pic[y:y + side:ev.SCALE, x:x + side:ev.SCALE], image)
    assert where["simple", 4, "source"][1] > where["simple", 0, "source"][1]


def test_cli_writes_json_table_and_picture(ckpt, tmp_path, capsys):
    out = tmp_path / "r" / "val.json"
    ev.main(["--ckpt", ckpt, "--n", "4", "--n_t2i", "7", "--samples_per_prompt", "1", "--n_edit",
             "2", "--steps", "1", "--weights", "model", "--out", str(out)])
    res = json.load(open(out))
    assert res["step"] == 2 and res["weights"] == "model" and res["counts"]["vqa"] == 4
    md = open(tmp_path / "r" / "val.md").read()
    assert "| VQA accuracy |" in md and md in capsys.readouterr().out
    assert "| oracle | blind | source |" in md  # the chance rows' columns
    assert Image.open(tmp_path / "r" / "val.png").size[0] >= 3 * 96


def test_baseline_cli_writes_the_same_eval_json(tmp_path):
    out = tmp_path / "source.json"
    args = ["--baseline", "source", "--n", "4", "--n_t2i", "7", "--samples_per_prompt", "1",
            "--n_edit", "20", "--out", str(out)]
    r = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env=ENV)  # a whole run, as users make it
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out))
    assert res["checkpoint"] == "baseline source" and res["metrics"]["edit_success"]["value"] == 0.0
    assert res["metrics"]["vqa_acc"]["value"] is None and set(res["chance"]) == set(ev.BASELINES)


def one_line_error(*args):
    with pytest.raises(SystemExit) as e:
        ev.main(list(args))
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg
    return msg


def test_bad_checkpoints_and_options_get_one_line_errors(ckpt, tmp_path, monkeypatch):
    assert "no checkpoint at" in one_line_error("--ckpt", str(tmp_path / "nothing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(ckpt):
        (bad / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    with open(bad / "ema.safetensors", "r+b") as f:
        f.truncate(100)
    assert "ema.safetensors is missing or corrupt" in one_line_error("--ckpt", str(bad))
    assert "--weights must be ema or model" in one_line_error("--ckpt", ckpt, "--weights", "best")
    assert "--n must be at least 1" in one_line_error("--ckpt", ckpt, "--n", "0")
    assert "shift >= 1" in one_line_error("--ckpt", ckpt, "--shift", "0.5")
    assert "unknown --baseline 'lucky'" in one_line_error("--baseline", "lucky")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused rather than run twice
    assert "not torchrun" in one_line_error("--baseline", "blank")
    monkeypatch.delenv("WORLD_SIZE")
    assert "--ckpt CHECKPOINT or --baseline" in one_line_error("--ckpt", ckpt, "--baseline",
                                                                "blank")
    # a checkpoint of the world as it was before its templates changed (here: 32 px)
    old = tmp_path / "old"
    old.mkdir()
    for f in os.listdir(ckpt):
        (old / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    meta = json.load(open(old / "config.json"))
    meta["world"]["size"] = 32
    json.dump(meta, open(old / "config.json", "w"))
    assert "no longer draws" in one_line_error("--ckpt", str(old))
    # an unwritable --out is refused before any compute
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("computed before the check"))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    unwritable = str(afile / "r.json")
    msg = f"cannot write the results file {afile}"
    assert msg in one_line_error("--ckpt", ckpt, "--out", unwritable)
    assert msg in one_line_error("--baseline", "blank", "--out", unwritable)


def test_a_failed_write_leaves_the_old_results_intact(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text('{"old": true}')
    (tmp_path / "eval.md").write_text("old table")
    result = ev.evaluate(ev.Baseline("blank", W), None, W, progress=False, chance=False, n=2,
                         n_t2i=7, samples_per_prompt=1, n_edit=2)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {**result, "bad": {1, 2}})  # not JSON
    with pytest.raises(TypeError):
        ev.main(["--baseline", "blank", "--out", str(out)])
    assert out.read_text() == '{"old": true}' and (tmp_path / "eval.md").read_text() == "old table"
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "eval.md"]  # no temporary file left either


def test_unseen_intelligent_edits_leave_out_the_tuning_set_instructions(ckpt, tmp_path):
    model, tok, world, _, _ = ev.load(ckpt)
    a = ev.evaluate(model, tok, world, progress=False, chance=False, **SMALL)
    m = a["metrics"]
    assert m["uniedit_unseen_success"]["value"] == m["uniedit_success"]["value"]  # none seen
    edits = [synth.make_sample(W, "uniedit", "val", i) for i in range(SMALL["n_edit"])]
    seen = frozenset(s["text"] for s in edits[:2])
    b = ev.evaluate(model, tok, world, progress=False, chance=False, seen=seen, **SMALL)
    assert b["items"]["intelligent"]["unseen"] == [float(s["text"] not in seen) for s in edits]
    # --unseen_from reads a dataset folder's train split, and refuses a folder that is not one
    synth.write_dataset(str(tmp_path / "d"), 40, "tiny", ("uniedit",), seed=0, workers=1)
    texts = ev.tuning_texts(str(tmp_path / "d"))
    records = [json.loads(x) for x in open(tmp_path / "d" / "samples.jsonl")]
    train = [s for s in records if s["split"] == "train"]
    assert texts == {s["text"] for s in train} and len(train) < 40
    assert "dataset" in one_line_error("--ckpt", ckpt, "--unseen_from", str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- --compare

def fake_result(vqa_correct, success, seed):
    """An eval.json with hand-set items: 4 questions and 4 intelligent edits."""
    items = {"vqa": {"index": [0, 1, 2, 3], "correct": vqa_correct},
             "intelligent": {"index": [0, 1, 2, 3], "success": success, "unseen": [1.0] * 4}}
    return {"counts": {"split": "val", "seed": seed, "vqa": 4}, "items": items,
            "metrics": {k: ev.interval(k, items) for k in ev.METRICS},
            "chance": {"blank": {k: 0.0 for k in ev.METRICS}}}


def write_runs(folder, row, per_seed):
    for seed, (vqa, success) in enumerate(per_seed):
        os.makedirs(folder / f"{row}_s{seed}", exist_ok=True)
        for split in ("val", "test_ood"):
            path = folder / f"{row}_s{seed}" / f"eval_{split}.json"
            json.dump(fake_result(vqa, success, seed), open(path, "w"))


def test_compare_gives_mean_std_chance_rows_and_paired_differences(tmp_path, capsys):
    write_runs(tmp_path, "base", [([1, 0, 0, 0], [0, 0, 0, 0]), ([1, 1, 0, 0], [0, 0, 0, 0])])
    write_runs(tmp_path, "tuned", [([1, 1, 1, 1], [0, 0, 0, 0]), ([1, 1, 1, 1], [0, 0, 0, 0])])
    ev.main(["--compare", str(tmp_path), "--rows", "base,tuned"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| base | 2 | 0.375 ± 0.177 | 0.375 ± 0.177 |")
    assert lines[3].startswith("| tuned | 2 | 1.000 ± 0.000 |")
    assert lines[4].startswith("| chance: blank | - | 0.000 |")
    diff = lines[-1].split(" | ")
    assert diff[2].startswith("+0.625 [") and diff[2].endswith("]*")  # every resample favours tuned
    assert diff[8] == "+0.000 [+0.000, +0.000]"  # identical intelligent-edit success: no difference


def test_compare_reads_rows_from_subfolders_so_experiments_share_a_baseline(tmp_path, capsys):
    write_runs(tmp_path / "first", "base", [([1, 0, 0, 0], [0, 0, 0, 0])])
    write_runs(tmp_path / "second", "lever", [([1, 1, 1, 0], [0, 0, 0, 0])])
    ev.main(["--compare", str(tmp_path), "--rows", "first/base,second/lever"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| first/base | 1 | 0.250 |")
    assert lines[3].startswith("| second/lever | 1 | 0.750 |")
    assert lines[-1].split(" | ")[2].startswith("+0.500 [")
    assert f"no lever_s<seed> folders and no lever folder in {tmp_path / 'first'}" in one_line_error(
        "--compare", str(tmp_path), "--rows", "first/base,first/lever")


def test_compare_takes_a_folder_holding_eval_files_as_one_run(tmp_path, capsys):
    write_runs(tmp_path, "base", [([1, 0, 0, 0], [0, 0, 0, 0]), ([1, 1, 0, 0], [0, 0, 0, 0])])
    write_runs(tmp_path / "single", "x", [([1, 1, 1, 0], [0, 0, 0, 0])])
    os.rename(tmp_path / "single" / "x_s0", tmp_path / "lever")  # eval files straight in lever/
    ev.main(["--compare", str(tmp_path), "--rows", "lever,base"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| lever | 1 | 0.750 |")
    assert lines[3].startswith("| base | 2 | 0.375 ± 0.177 |")
    assert lines[-1].split(" | ")[2].startswith("-0.375 [")
    shutil.copytree(tmp_path / "lever", tmp_path / "base")  # a base/ with its own eval files
    ev.main(["--compare", str(tmp_path), "--rows", "lever,base"])  # is read before base_s0, _s1
    assert capsys.readouterr().out.splitlines()[3].startswith("| base | 1 | 0.750 |")


def test_compare_of_val_only_rows_leaves_test_ood_columns_empty(tmp_path, capsys):
    """A sweep scored on val alone (tuning never looks at test_ood) still compares: its test_ood
    columns say "-", and a later row must have every split the first has."""
    write_runs(tmp_path, "default", [([1, 0, 0, 0], [0, 0, 0, 0])])
    write_runs(tmp_path, "cfg3", [([1, 1, 1, 0], [0, 0, 0, 0])])
    for row in ("default", "cfg3"):
        os.remove(tmp_path / f"{row}_s0" / "eval_test_ood.json")
    ev.main(["--compare", str(tmp_path), "--rows", "default,cfg3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| default | 1 | 0.250 | - | ")
    assert lines[4].startswith("| chance: blank | - | 0.000 | - | ")
    diff = lines[-1].split(" | ")
    assert diff[2].startswith("+0.500 [") and diff[3] == "-"
    write_runs(tmp_path, "full", [([1, 1, 1, 0], [0, 0, 0, 0])])  # a row with test_ood first
    missing = tmp_path / "cfg3_s0" / "eval_test_ood.json"
    assert f"{missing} is missing" in one_line_error("--compare", str(tmp_path), "--rows",
                                                     "full,cfg3")


def test_compare_refuses_missing_stale_or_truncated_results_naming_the_file(tmp_path):
    assert f"--compare folder {tmp_path / 'none'} does not exist" in one_line_error(
        "--compare", str(tmp_path / "none"), "--rows", "base")
    write_runs(tmp_path, "base", [([1, 0, 0, 0], [0, 0, 0, 0])])
    assert f"no uniedit_s<seed> folders and no uniedit folder in {tmp_path}" in one_line_error(
        "--compare", str(tmp_path), "--rows", "base,uniedit")
    val = tmp_path / "base_s0" / "eval_val.json"
    json.dump({"understanding": {"accuracy": 0.5}}, open(val, "w"))  # by an older eval.py
    assert f"{val} has no 'counts'" in one_line_error("--compare", str(tmp_path), "--rows", "base")
    val.write_text('{"counts": {"split": "val", "se')  # cut short by a crash
    assert f"{val} is not valid JSON" in one_line_error("--compare", str(tmp_path), "--rows",
                                                         "base")
    os.remove(val)
    assert f"{val} is missing" in one_line_error("--compare", str(tmp_path), "--rows", "base")


def test_cell_errors_sort_each_wrong_cell_into_one_kind():
    red_sq, blue_sq = ("square", "red", "large"), ("square", "blue", "large")
    small_circle = ("circle", "red", "small")
    wanted = {(0, 0): red_sq, (0, 1): small_circle, (1, 1): blue_sq, (2, 2): red_sq}
    got = {(0, 0): red_sq,                        # right
           (0, 1): ("circle", "red", "large"),    # wrong size
           (1, 1): ("circle", "blue", "large"),   # wrong shape (the first attribute that differs)
           (3, 3): red_sq,                        # the (2, 2) object one cell off: one error, not two
           (3, 0): blue_sq,                       # extra
           (1, 0): ev.MALFORMED}                  # unreadable
    assert ev.cell_errors(got, wanted) == {"malformed": 1, "wrong shape": 1, "wrong color": 0,
                                           "wrong size": 1, "wrong cell": 1, "missing": 0,
                                           "extra": 1}
    # an object drawn elsewhere while another of its kind is missing is still one move; the rest
    # of what is missing counts as missing
    assert ev.cell_errors({(3, 3): blue_sq}, {(0, 0): red_sq, (1, 1): blue_sq}) == \
        {"malformed": 0, "wrong shape": 0, "wrong color": 0, "wrong size": 0, "wrong cell": 1,
         "missing": 1, "extra": 0}
    assert sum(ev.cell_errors(wanted, wanted).values()) == 0


def test_edit_records_carry_cell_errors_and_summarize_averages_them_per_image():
    s = find("edit", lambda s: s["family"] == "recolor")
    src, tgt = cell_map_of(s["scene"]), cell_map_of(s["target_scene"])
    changed = [c for c in tgt if src.get(c) != tgt[c]]
    recs = edit_recs("simple", [(s["image"], s), (s["target"], s)])  # unedited, then right
    assert recs[0]["errors"]["wrong color"] == len(changed) and sum(recs[1]["errors"].values()) == 0
    per_image = ev.summarize(recs, {})["cell_errors"]["simple"]
    assert per_image["wrong color"] == len(changed) / 2


def cell_map_of(scene):
    return {(o[3], o[4]): tuple(o[:3]) for o in scene}


class LinearTokens:
    """A stand-in model whose semantic tokens are given: one-hot attribute codes (readable by a
    linear probe), or noise (not)."""

    def __init__(self, readable):
        import model as M
        self.cfg = M.UMMConfig.preset("tiny", vocab_size=1)
        self.readable = readable

    def semantic_tokens(self, x):
        import torch
        labels = torch.stack([synth_labels(im) for im in x])  # (B, 16, 3)
        if not self.readable:
            return torch.randn(len(x), 16, 32)
        return torch.cat([torch.nn.functional.one_hot(labels[..., i], k).float()
                          for i, k in enumerate((6, 9, 3))], -1)


def synth_labels(image):
    """A cell's labels read back from pixels by the judge (the stand-in's perfect perception)."""
    import model as M
    import torch
    arr = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    return M.cell_labels(synth.parse(arr, W).to_json(), M.UMMConfig.preset("tiny", vocab_size=1))


def test_linear_probe_reads_linear_codes_and_not_noise():
    good = ev.linear_probe(LinearTokens(True), W, n_train=60, n_test=30)
    assert good == {"shape": 1.0, "color": 1.0, "size": 1.0}
    bad = ev.linear_probe(LinearTokens(False), W, n_train=60, n_test=30)
    assert max(bad.values()) < 0.75  # random tokens: about chance per attribute (1/5, 1/8, 1/2)
    assert bad["color"] < 0.4


class CellOracle:
    """A stand-in trunk whose output at each noisy token is its target cell's labels, one-hot, read
    by an identity gen_cells head: it names every cell, or (blind) nothing at t = 1, where the
    noisy image is pure noise."""

    def __init__(self, blind_at_t1):
        import model as M
        self.cfg = M.UMMConfig.preset("tiny", vocab_size=1)
        self.layouts = {task: M.Layout(self.cfg, task) for task in ("t2i", "edit")}
        self.blind_at_t1 = blind_at_t1
        self.gen_cells = lambda h: h

    def velocity_patches(self, task, sub, x_t, t, *keep):
        import torch
        import model as M
        L = self.layouts[task]
        labels = sub["target_cells"]  # (B, N, 3)
        code = torch.cat([torch.nn.functional.one_hot(labels[..., i], k).float()
                          for i, k in enumerate(M.CELL_CLASSES)], -1)  # (B, N, 18)
        if self.blind_at_t1:
            code = code * (t < 1).float()[:, None, None]  # all zero: argmax names "empty"
        h = torch.zeros(len(labels), L.T, code.shape[-1])
        h[:, L.noisy] = code
        return None, None, h


def test_placement_probe_scores_what_the_trunk_names_from_the_text():
    sets = ev.placement_sets(W, "val", 12)
    scenes, adds = sets["scene"][0], sets["add"][0]
    assert {s["family"] for s in scenes} == {"scene"} and {s["family"] for s in adds} == {"add"}
    assert sets["scene"][1].sum(1).tolist() == [len(s["target_scene"]) for s in scenes]
    assert sets["add"][1].sum(1).tolist() == [1] * 12  # only the added object's cell is named
    tok = synth.get_tokenizer("tiny")
    sees = ev.placement_probe(CellOracle(False), tok, W, n=12)
    blind = ev.placement_probe(CellOracle(True), tok, W, n=12)
    for name, samples in (("scene", scenes), ("add", adds)):
        empty = 1 - sum(len(s["target_scene"]) for s in samples) / (12 * 16)
        assert sees[name]["chance"] == blind[name]["chance"] == pytest.approx(empty)
        for t, row in sees[name]["by_t"].items():
            assert row == {"occupancy": 1.0, "objects": 1.0, "scenes": 1.0}, (name, t)
        assert blind[name]["by_t"]["0.9"] == {"occupancy": 1.0, "objects": 1.0, "scenes": 1.0}
        assert blind[name]["by_t"]["1.0"] == {"occupancy": pytest.approx(empty), "objects": 0.0,
                                              "scenes": 0.0}
