"""Tests of eval.py: python -m pytest tests/test_eval.py -q

The judges are tested on hand-made images (clean targets, unedited sources, blank images, known partial
edits); evaluate() and the CLI run on a 2-step checkpoint of a narrow model, made once for the module."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import eval as ev
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = synth.get_world("tiny")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
SMALL = dict(n=8, n_t2i=7, samples_per_prompt=1, n_edit=4, sampling=ev.Sampling(steps=2))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return os.path.join(tiny_run, "step_000002")


def find(task, ok):
    """The first val sample of `task` that satisfies ok(sample)."""
    return next(s for s in (synth.make_sample(W, task, "val", i) for i in range(1000)) if ok(s))


def render(objs):
    return synth.render(synth.Scene.of(objs), W)


def scribble(img, cell):
    """Paint a red/green checkerboard over a cell: the parser cannot read it (a malformed cell)."""
    img = img.copy()
    c = W.cell
    block = img[cell[0] * c:(cell[0] + 1) * c, cell[1] * c:(cell[1] + 1) * c]
    block[::2, ::2], block[1::2, 1::2] = (255, 0, 0), (0, 255, 0)
    return img


BLANK = np.zeros((W.size, W.size, 3), np.uint8)


def test_edit_judge_target_source_blank():
    s = find("edit", lambda s: s["family"] == "recolor" and len(s["scene"]) >= 2)
    n_stay = len(s["scene"]) - 1
    target = ev.edit_stats([ev.judge_edit(s["target"], s, W)])
    assert target == {"n": 1, "success": 1.0, "precision": 1.0, "recall": 1.0, "preservation": 1.0,
                      "pixel_l1": 0.0, "overall": 1.0}
    src = ev.judge_edit(s["image"], s, W)
    assert (src["success"], src["followed"], src["changed"], src["kept"]) == (False, 0, 0, n_stay)
    src = ev.edit_stats([src])
    assert (src["recall"], src["preservation"], src["overall"]) == (0.0, 1.0, 0.0)
    blank = ev.edit_stats([ev.judge_edit(BLANK, s, W)])
    assert blank["success"] == blank["precision"] == blank["recall"] == blank["preservation"] == blank["overall"] == 0
    assert blank["pixel_l1"] > 0
    # a malformed blob in an empty cell spoils an otherwise perfect edit
    empty = next((r, c) for r in range(W.grid) for c in range(W.grid) if [r, c] not in [o[3:] for o in s["scene"]])
    blob = ev.judge_edit(scribble(s["target"], empty), s, W)
    assert (blob["success"], blob["followed"], blob["changed"]) == (False, 1, 2)


def test_edit_judge_known_partial_edit():
    s = find("edit", lambda s: s["family"] == "swap" and len(s["scene"]) >= 4)
    src, tgt = ev.cell_map(s["scene"]), ev.cell_map(s["target_scene"])
    a, b = sorted(x for x in set(src) | set(tgt) if src.get(x) != tgt.get(x))
    stay = [o for o in s["scene"] if tuple(o[3:]) not in (a, b)]
    # only the first half of the swap is done (cell b keeps its object), and one should-stay object is lost
    out = [[*tgt[a], *a], [*src[b], *b]] + stay[1:]
    j = ev.judge_edit(render(out), s, W)
    counts = (j["should_change"], j["followed"], j["changed"], j["should_stay"], j["kept"])
    assert counts == (2, 1, 2, len(stay), len(stay) - 1)
    st = ev.edit_stats([j])
    assert st["success"] == 0 and st["recall"] == 0.5 and st["precision"] == 0.5
    assert st["preservation"] == pytest.approx((len(stay) - 1) / len(stay))
    assert st["overall"] == pytest.approx(math.sqrt(0.5 * (len(stay) - 1) / len(stay)))
    # pixel L1 covers the should-stay cells only: exactly the lost object's pixels differ from the target
    lost = stay[0]
    assert j["l1_sum"] == pytest.approx(np.abs(render([lost]).astype(float)).sum() / 255)
    assert j["l1_n"] == (W.grid ** 2 - 2) * W.cell ** 2 * 3
    # pooling: two samples' counts add up before the ratios are taken
    pooled = ev.edit_stats([j, ev.judge_edit(s["target"], s, W)])
    assert pooled["recall"] == 0.75 and pooled["success"] == 0.5


def test_noop_edits_are_vacuously_followed():
    s = find("uniedit", lambda s: not s["edit"]["atoms"] and len(s["scene"]) >= 1)
    assert s["scene"] == s["target_scene"]
    same = ev.edit_stats([ev.judge_edit(s["image"], s, W)])  # leaving the scene alone is the right edit
    assert same == {"n": 1, "success": 1.0, "precision": 1.0, "recall": 1.0, "preservation": 1.0,
                    "pixel_l1": 0.0, "overall": 1.0}
    blank = ev.edit_stats([ev.judge_edit(BLANK, s, W)])
    assert (blank["success"], blank["recall"], blank["preservation"], blank["overall"]) == (0.0, 1.0, 0.0, 0.0)


def test_t2i_judge_and_shapeeval_overall():
    fams = {f: find("t2i", lambda s, f=f: s["family"] == f) for f in synth.T2I_FAMILIES}
    for f, s in fams.items():
        assert ev.judge_t2i(s["target"], s, W)["correct"], f  # the clean target satisfies every clause
        assert not ev.judge_t2i(BLANK, s, W)["correct"], f
        assert not ev.judge_t2i(scribble(s["target"], (3, 3) if [3, 3] not in [o[3:] for o in s["target_scene"]]
                                          else (0, 0)), s, W)["correct"], f  # any malformed cell fails GenEval's rule
    # three categories right, three wrong, 4 images each: overall is the mean over the six categories
    recs = [{"part": "t2i", "family": f, **ev.judge_t2i(s["target"] if f in ev.GENEVAL[:3] else BLANK, s, W)}
            for f, s in fams.items() for _ in range(4)]
    g = ev.summarize(recs, {})["generation"]
    assert g["overall"] == 0.5 and g["by_category"]["colors"] == {"n": 4, "accuracy": 0.0}
    assert g["scene"]["f1"] == 0.0  # the full-scene prompt got blank images


def test_full_scene_object_f1():
    s = find("t2i", lambda s: s["family"] == "scene" and len(s["target_scene"]) >= 2)
    n = len(s["target_scene"])
    f1 = lambda *images: ev.summarize([{"part": "t2i", "family": "scene", **ev.judge_t2i(im, s, W)} for im in images],
                                      {})["generation"]["scene"]
    assert f1(s["target"]) == {"n": 1, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert f1(BLANK)["f1"] == 0.0
    part = f1(render(s["target_scene"][1:]))  # one object missing
    assert (part["precision"], part["recall"]) == (1.0, pytest.approx((n - 1) / n))
    first = s["target_scene"][0]
    recolored = [[first[0], "white" if first[1] != "white" else "red", *first[2:]]] + s["target_scene"][1:]
    wrong = f1(render(recolored))  # one object drawn in the wrong color: a false positive and a miss
    assert wrong["precision"] == wrong["recall"] == wrong["f1"] == pytest.approx((n - 1) / n)


def test_vqa_pooling_and_consistency():
    q = {"part": "vqa", "text": "q", "said": "a", "truth": "a"}
    recs = [{**q, "family": "count", "hops": 0, "correct": True, "blind_correct": False},
            {**q, "family": "count", "hops": 0, "correct": False, "blind_correct": True},
            {**q, "family": "relate_2hop", "hops": 2, "correct": True, "blind_correct": False}]
    edit = {"should_change": 1, "followed": 1, "changed": 1, "should_stay": 0, "kept": 0, "l1_sum": 0.0, "l1_n": 0}
    recs += [{"part": "uniedit", "family": "conditional", "level": "L1", **edit, "success": ok, "probe_correct": right,
              "unseen": ok or right} for ok, right in ((True, True), (False, False), (True, False), (False, True))]
    r = ev.summarize(recs, {})
    u = r["understanding"]
    assert (u["accuracy"], u["blind_accuracy"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert u["by_family"]["count"] == {"n": 2, "accuracy": 0.5, "blind_accuracy": 0.5}
    assert u["by_hops"]["2"]["accuracy"] == 1.0
    ie = r["editing"]["intelligent"]
    assert (ie["consistency"], ie["probe_accuracy"], ie["success"]) == (0.5, 0.5, 0.5)
    assert (ie["unseen"]["n"], ie["unseen"]["success"]) == (3, pytest.approx(2 / 3))


def test_blind_baseline_majority_per_text_then_family():
    per_text, per_family = table = ev.blind_table(W, n=3000)
    qs = [synth.make_sample(W, "vqa", "train", i) for i in range(3000)]
    text = max(set(q["text"] for q in qs), key=lambda t: sum(q["text"] == t for q in qs))  # the most frequent text
    votes = [q["answer"] for q in qs if q["text"] == text]
    assert per_text[text] == max(set(votes), key=votes.count)
    unseen = {"text": "How many unseen questions are there?", "family": "count"}
    assert ev.blind_answer(unseen, table) == per_family["count"]
    # "exist" answers are balanced yes/no, so the blind baseline is near chance there
    exist = [q for q in (synth.make_sample(W, "vqa", "val", i) for i in range(600)) if q["family"] == "exist"]
    blind = sum(ev.blind_answer(q, table) == q["answer"] for q in exist) / len(exist)
    assert 0.25 < blind < 0.75


def test_evaluate_is_deterministic_returns_every_key_and_ignores_batching(ckpt, monkeypatch):
    model, tok, world, _, _ = ev.load(ckpt)
    a = ev.evaluate(model, tok, world, progress=False, **SMALL)
    assert a == ev.evaluate(model, tok, world, progress=False, **SMALL)
    monkeypatch.setattr(ev, "BATCH", 3)  # noise is drawn per sample, so batching changes nothing
    assert a == ev.evaluate(model, tok, world, progress=False, **SMALL)
    assert set(a) == {"counts", "understanding", "generation", "editing", "sampling"}
    assert {"accuracy", "blind_accuracy", "by_family", "by_hops", "examples"} <= set(a["understanding"])
    assert set(a["generation"]["by_category"]) == set(ev.GENEVAL)
    assert {"precision", "recall", "f1"} <= set(a["generation"]["scene"])
    for name in ("simple", "intelligent"):
        assert {"success", "precision", "recall", "preservation", "pixel_l1", "overall", "by_family",
                "by_level"} <= set(a["editing"][name])
    assert {"consistency", "probe_accuracy"} <= set(a["editing"]["intelligent"])
    assert a["counts"]["t2i_prompts"] == 7 and a["editing"]["simple"]["n"] == 4 and a["understanding"]["n"] == 8
    assert set(ev.headline(a)) >= {"vqa_acc", "shapeeval", "edit_overall", "uniedit_overall", "consistency"}


def test_cli_writes_json_and_table(ckpt, tmp_path):
    out = tmp_path / "r" / "val.json"
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--n", "4", "--n_t2i", "7", "--samples_per_prompt",
                        "1", "--n_edit", "2", "--steps", "1", "--weights", "model", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out))
    assert res["step"] == 2 and res["weights"] == "model" and res["counts"]["vqa"] == 4
    md = open(tmp_path / "r" / "val.md").read()
    assert "| understanding | VQA accuracy" in md and md in r.stdout


def test_cli_bad_checkpoints_get_one_line_errors(ckpt, tmp_path):
    def error(*args):
        with pytest.raises(SystemExit) as e:
            ev.main(["--ckpt", *args])
        assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
        return e.value.code
    assert "no checkpoint at" in error(str(tmp_path / "nothing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(ckpt):
        (bad / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    with open(bad / "ema.safetensors", "r+b") as f:
        f.truncate(100)
    assert "ema.safetensors is missing or corrupt" in error(str(bad))
    assert "--weights must be ema or model" in error(ckpt, "--weights", "best")
    assert "--n must be at least 1" in error(ckpt, "--n", "0")
    assert "shift >= 1" in error(ckpt, "--shift", "0.5")


def test_unseen_intelligent_edits_leave_out_the_tuning_set_instructions(ckpt, tmp_path):
    model, tok, world, _, _ = ev.load(ckpt)
    a = ev.evaluate(model, tok, world, progress=False, **SMALL)
    whole = {k: v for k, v in a["editing"]["intelligent"].items() if k in a["editing"]["intelligent"]["unseen"]}
    assert a["editing"]["intelligent"]["unseen"] == whole  # nothing seen: every edit is unseen
    edits = [synth.make_sample(W, "uniedit", "val", i) for i in range(SMALL["n_edit"])]
    seen = frozenset(s["text"] for s in edits[:2])
    b = ev.evaluate(model, tok, world, progress=False, seen=seen, **SMALL)
    assert b["editing"]["intelligent"]["unseen"]["n"] == sum(s["text"] not in seen for s in edits) < len(edits)
    # --unseen_from reads a dataset folder's train split, and refuses a folder that is not one
    synth.write_dataset(str(tmp_path / "d"), 40, "tiny", ("uniedit",), seed=0, workers=1)
    texts = ev.tuning_texts(str(tmp_path / "d"))
    train = [s for s in (json.loads(x) for x in open(tmp_path / "d" / "samples.jsonl")) if s["split"] == "train"]
    assert texts == {s["text"] for s in train} and len(train) < 40
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", ckpt, "--unseen_from", str(tmp_path / "nothing")])
    assert e.value.code.startswith("error: ") and "\n" not in e.value.code


def test_compare_table_is_mean_and_std_over_seeds(tmp_path, capsys):
    def result(acc, success):
        edit = {"success": success, "overall": 0.5, "consistency": 0.25, "unseen": {"success": success}}
        return {"understanding": {"accuracy": acc}, "generation": {"overall": 0.1},
                "editing": {"simple": {"success": 0.0, "overall": 0.0}, "intelligent": edit}}
    for seed, (acc, success) in enumerate([(0.4, 0.1), (0.6, 0.3)]):
        for split in ("val", "test_ood"):
            os.makedirs(tmp_path / f"base_s{seed}", exist_ok=True)
            json.dump(result(acc, success), open(tmp_path / f"base_s{seed}" / f"eval_{split}.json", "w"))
    ev.main(["--compare", str(tmp_path), "--rows", "base"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| base | 2 | 0.500 ± 0.141 | 0.500 ± 0.141 | 0.100 ± 0.000 |") and "0.200 ± 0.141" in row
    with pytest.raises(SystemExit) as e:
        ev.main(["--compare", str(tmp_path), "--rows", "base,uniedit"])
    assert e.value.code == f"error: no uniedit_s<seed> folders in {tmp_path}"
