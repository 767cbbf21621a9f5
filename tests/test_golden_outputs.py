"""What eval.py reports and what sample.py writes, checked against known outputs:
python -m pytest tests/test_golden_outputs.py -q

evaluate() runs end to end on a stand-in model whose every answer and image is chosen (right,
wrong, cluttered, swapped, unchanged), so each headline number has a value worked out here from
the samples themselves, on outputs where plausible wrong formulas give other numbers. sample.py
runs with a stand-in for the model calls, so each file it writes can be checked for what it
holds: round r edits round r - 1's output, n images of one prompt differ, the answer printed is
the model's."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import sample
import synth
from model import EOS, PAD, UMMConfig

W = synth.get_world("tiny")
TOK = synth.get_tokenizer("tiny")
BLANK = np.zeros((W.size, W.size, 3), np.uint8)


def render(objs):
    return synth.render(synth.Scene.of(objs), W)


def free_cell(*scenes):
    taken = {tuple(o[3:]) for s in scenes for o in s}
    return next((r, c) for r in range(W.grid) for c in range(W.grid) if (r, c) not in taken)


def right(question):  # the stand-in answers right exactly the questions of even length
    return len(question["text"]) % 2 == 0


def clutter(s):  # the exact target plus one more object, where neither scene has one
    cell = free_cell(s["scene"] or [], s["target_scene"])
    return render(s["target_scene"] + [["cross", "white", "small", *cell]])


def swapped(s):  # the target's two objects trade cells: the prompt's relation turns around
    (a, b) = s["target_scene"]
    return render([a[:3] + b[3:], b[:3] + a[3:]])


class Known(ev.Baseline):
    """A stand-in model with chosen outputs (see the rules in each method)."""

    def answer(self, questions):
        return [q["answer"] if right(q) else "nothing" for q in questions]

    def draw(self, samples, keys):
        out = []
        for s, (_, k) in zip(samples, keys):
            if s["task"] == "t2i":
                fam = s["family"]
                if fam == "two_object":  # an extra object, then the exact target
                    out.append(clutter(s) if k == 0 else s["target"])
                elif fam == "position":  # the two objects the wrong way round, twice
                    out.append(swapped(s))
                elif fam in ("single_object", "counting", "scene"):  # right once, then blank
                    out.append(s["target"] if k == 0 else BLANK)
                else:
                    out.append(BLANK)
            elif s["task"] == "edit":  # right, right plus clutter, unchanged: by index mod 3
                out.append([s["target"], clutter(s), s["image"]][s["index"] % 3])
            else:  # intelligent edits: right on even indices, unchanged on odd ones
                out.append(s["target"] if s["index"] % 2 == 0 else s["image"])
        return out


def cells(scene):
    return {tuple(o[3:]): tuple(o[:3]) for o in scene}


def test_evaluate_reports_hand_computed_values_for_known_outputs():
    split, n, n_t2i, n_edit = "test", 12, 14, 6
    mk = lambda task, i: synth.make_sample(W, task, split, i)
    vqa = [mk("vqa", i) for i in range(n)]
    uniedits = [mk("uniedit", i) for i in range(n_edit)]
    seen = frozenset([uniedits[0]["text"]])  # a tuning set that holds the first instruction
    r = ev.evaluate(Known("known", W), None, W, split, n=n, n_t2i=n_t2i, samples_per_prompt=2,
                    n_edit=n_edit, progress=False, chance=False, seen=seen)
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert [x["text"] for x in r["understanding"]["examples"]] == [q["text"] for q in vqa[:8]]
    assert m["vqa_acc"] == pytest.approx(np.mean([right(q) for q in vqa]))
    # generation, 2 prompts per family, 2 images each; per prompt strict / GenEval's rule:
    # single_object and counting 0.5 / 0.5, two_object 0.5 / 1 (an extra object is forgiven),
    # position 0 / 0 (the relation is wrong: strict checks GenEval's clauses too), the others 0
    assert r["counts"]["t2i_prompts"] == 14
    assert m["shapeeval"] == pytest.approx(1.5 / 6)
    assert m["shapeeval_geneval"] == pytest.approx(2 / 6)
    assert r["generation"]["by_category"]["two_object"] == {"n": 2, "strict": 0.5, "geneval": 1.0}
    # full-scene captions: one image right, one blank per prompt: F1 = 2 tp / (pred + truth)
    assert m["scene_exact"] == pytest.approx(0.5) and m["scene_f1"] == pytest.approx(2 / 3)
    # simple edits: index 0 and 3 right, 1 and 4 right plus clutter, 2 and 5 unchanged
    simple = [mk("edit", i) for i in range(n_edit)]
    per = []
    for s in simple:
        src, tgt = cells(s["scene"]), cells(s["target_scene"])
        stay = sum(src.get(x) == tgt.get(x) for x in np.ndindex(W.grid, W.grid))  # empty ones too
        per.append({0: (1, 1, 1), 1: (0, 1, (stay - 1) / stay), 2: (0, 0, 1)}[s["index"] % 3])
    success, following, preservation = np.array(per).T
    assert m["edit_success"] == pytest.approx(success.mean())
    assert m["edit_following"] == pytest.approx(following.mean())
    assert m["edit_preservation"] == pytest.approx(preservation.mean())
    assert m["edit_overall"] == pytest.approx(np.sqrt(following * preservation).mean())
    # intelligent edits: right on even indices; an unchanged output is right on a no-op
    noop = np.array([sorted(s["scene"]) == sorted(s["target_scene"]) for s in uniedits])
    even = np.arange(n_edit) % 2 == 0
    won = even | noop
    probe = np.array([right({"text": s["probe"]["question"]}) for s in uniedits])
    assert m["uniedit_success"] == pytest.approx(won.mean())
    assert m["probe_acc"] == pytest.approx(probe.mean())
    assert 0 < probe.sum() < n_edit and (won & ~probe).any()  # so the shares below are not trivial
    assert m["edit_if_probe_right"] == pytest.approx((won & probe).sum() / probe.sum())
    assert m["edit_if_probe_wrong"] == pytest.approx((won & ~probe).sum() / (~probe).sum())
    unseen = np.array([s["text"] not in seen for s in uniedits])
    assert won[unseen].mean() != won[~unseen].mean()
    assert m["uniedit_unseen_success"] == pytest.approx(won[unseen].mean())
    # self-consistency: over the edits an answer decides, the output is the edit its answer implies
    agree = []
    for s, p, e in zip(uniedits, probe, even):
        if s["edit"]["if_answer"] is None and s["edit"]["answer_sets"] is None:
            continue
        implied = synth.implied_target(s, s["probe"]["answer"] if p else "nothing", W)
        out = s["target_scene"] if e else s["scene"]
        agree.append(implied is not None and cells(implied) == cells(out))
    assert agree and m["self_consistency"] == pytest.approx(np.mean(agree))
    table = r["consistency"]
    assert table["probe right / edit right"] == (won & probe).sum()
    assert table["probe wrong / edit wrong"] == (~won & ~probe).sum()


class Talker:
    """A stand-in UMM that answers every question with `ids`."""

    def __init__(self, ids):
        self.cfg = UMMConfig.preset("tiny", vocab_size=TOK.get_vocab_size())
        self.ids = ids

    def generate_text(self, sub):
        return torch.tensor([self.ids] * sub["tokens"].shape[0])


def test_an_answer_is_read_up_to_its_first_eos():
    yes, no = TOK.encode("yes").ids, TOK.encode("no").ids
    q = {"text": "Is there a red circle?", "image": BLANK}
    assert ev.answer(Talker(yes + [EOS] + no + [PAD]), TOK, [q, q]) == ["yes", "yes"]
    assert ev.answer(Talker(no + [EOS] + [EOS] + yes), TOK, [q]) == ["no"]
    assert ev.answer(Talker(yes + no), TOK, [q]) == [TOK.decode(yes + no).strip()]  # no EOS: all


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture
def stand_in(monkeypatch):
    """sample.py with its model calls replaced: the checkpoint is never read, every draw and
    answer is recorded, an edit moves the whole picture one cell to the right."""
    calls = {"draw": [], "answer": []}
    monkeypatch.setattr(sample.ev, "load", lambda *a, **k: (None, TOK, W, None, None))

    def draw(model, tok, samples, keys, sampling, seed=0, device="cpu"):
        calls["draw"].append((samples, keys))
        if samples[0]["task"] == "t2i":  # an image that is a function of its noise key
            return np.stack([np.full((W.size, W.size, 3), synth.sample_seed(seed, k) % 251,
                                     np.uint8) for k in keys])
        return np.stack([np.roll(s["image"], W.cell, axis=1) for s in samples])

    def answer(model, tok, questions, device="cpu"):
        calls["answer"].append(questions)
        return ["magenta"] * len(questions)

    monkeypatch.setattr(sample.ev, "draw", draw)
    monkeypatch.setattr(sample.ev, "answer", answer)
    return calls


@pytest.fixture
def png(tmp_path):
    path = str(tmp_path / "in.png")
    Image.fromarray(render([["circle", "red", "large", 1, 0], ["square", "green", "small", 2, 2]])
                    ).save(path)
    return path


def read(path):
    return np.array(Image.open(path))


def run(tmp_path, *args):
    out = str(tmp_path / "out")
    sample.main(["--ckpt", "unused", "--out", out, *args])
    return out


def test_each_round_edits_the_previous_rounds_output(stand_in, tmp_path, png):
    out = run(tmp_path, "--image", png, "--edit", "Remove the red circle.",
              "--edit", "Paint the square blue.", "--edit", "Make the square large.")
    source = read(png)
    for r in range(4):  # round r's output: the source moved r cells
        assert np.array_equal(read(os.path.join(out, f"step_{r}.png")),
                              np.roll(source, r * W.cell, axis=1)), r
    inputs = [samples[0]["image"] for samples, _ in stand_in["draw"]]
    assert [s[0]["text"] for s, _ in stand_in["draw"]] == [
        "Remove the red circle.", "Paint the square blue.", "Make the square large."]
    for r, im in enumerate(inputs):
        assert np.array_equal(im, np.roll(source, r * W.cell, axis=1)), r
    strip = read(os.path.join(out, "strip.png"))[::4, ::4]  # drawn at 4x
    steps = [np.roll(source, r * W.cell, axis=1) for r in range(4)]
    assert np.array_equal(strip, sample.row(steps))


def test_n_images_of_one_prompt_start_from_n_different_noises(stand_in, tmp_path):
    args = ("--prompt", "A red circle.", "--n", "4", "--seed", "2")
    out = run(tmp_path, *args)
    images = [read(os.path.join(out, f"gen_{k:02d}.png")) for k in range(4)]
    (samples, keys), = stand_in["draw"]
    assert len(samples) == 4 and len(set(keys)) == 4
    assert len({im[0, 0, 0] for im in images}) == 4  # four different images
    run(tmp_path, *args)  # the same seed: the same noises
    assert stand_in["draw"][1][1] == keys


def test_the_answer_printed_is_the_models_about_the_given_image(stand_in, tmp_path, png, capsys):
    run(tmp_path, "--image", png, "--question", "What color is the circle?")
    assert capsys.readouterr().out == "Q: What color is the circle?\nA: magenta\n"
    (q,), = stand_in["answer"]
    assert q["text"] == "What color is the circle?" and np.array_equal(q["image"], read(png))
    # --from_synth takes the question, and the image unless --image gives one; truth beside it
    truth = synth.make_sample(W, "vqa", "val", 3)
    assert truth["answer"] != "magenta" and not np.array_equal(truth["image"], read(png))
    run(tmp_path, "--from_synth", "vqa:val:3")
    said = capsys.readouterr().out
    assert said == f"Q: {truth['text']}\nA: magenta   (truth: {truth['answer']})\n"
    assert np.array_equal(stand_in["answer"][1][0]["image"], truth["image"])
    run(tmp_path, "--from_synth", "vqa:val:3", "--image", png)
    assert stand_in["answer"][2][0]["text"] == truth["text"]
    assert np.array_equal(stand_in["answer"][2][0]["image"], read(png))


def test_resize_keeps_the_palette_of_a_scaled_render(tmp_path):
    small = render([["circle", "red", "large", 0, 0], ["cross", "cyan", "small", 3, 1]])
    path = str(tmp_path / "big.png")
    Image.fromarray(small.repeat(2, 0).repeat(2, 1)).save(path)  # 128 px, each pixel doubled
    assert np.array_equal(sample.read_image(path, W.size, resize=True), small)
