"""Tests of the shapes world: python -m pytest tests/test_synth.py -q"""
import collections
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLDS = list(synth.WORLDS)


def samples(world, task, split="train", n=200):
    return [synth.make_sample(world, task, split, i) for i in range(n)]


@pytest.mark.parametrize("world", WORLDS)
def test_parser_exact_on_random_renders(world):
    w = synth.WORLDS[world]
    rng = random.Random(0)
    for _ in range(2000):
        objs = synth.rand_scene(rng, w, "test_ood")
        scene = synth.Scene.of(objs)
        assert synth.parse(synth.render(scene, w), w) == scene


@pytest.mark.parametrize("world", WORLDS)
def test_parser_degrades_gracefully(world):
    w = synth.WORLDS[world]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (w.size, w.size, 3), dtype=np.uint8)
    parsed = synth.parse(noise, w)
    assert len(parsed.malformed) == w.grid ** 2 and not parsed.objects
    # a half-drawn object is malformed, a blank image is empty
    img = synth.render([("square", "red", "large", 1, 1)], w)
    c = w.cell
    img[c:2 * c, c:c + c // 2] = 0
    assert synth.parse(img, w).malformed == ((1, 1),)
    assert synth.parse(np.zeros_like(img), w) == synth.Scene(())
    with pytest.raises(ValueError, match="needs"):
        synth.parse(np.zeros((w.size + 1, w.size, 3), np.uint8), w)


@pytest.mark.parametrize("world", WORLDS)
def test_every_two_templates_differ_in_a_quarter_of_their_pixels_at_the_parsers_offsets(world):
    w = synth.WORLDS[world]
    tm = synth.templates(w)
    keys = list(tm)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:  # the parser shifts each by +-1 px, so up to 2 px apart
            d = min(synth.template_distance(tm[a], synth.shifted(tm[b], dy, dx))
                    for dy in range(-2, 3) for dx in range(-2, 3))
            assert d >= synth.TEMPLATE_MARGIN, (a, b, d)
    # so no drawing is within the parser's gate of two templates (the Jaccard distance is a metric)
    assert 2 * synth.SHAPE_GATE < synth.TEMPLATE_MARGIN


def box_blur(img):
    padded = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
    h, w = img.shape[:2]
    total = sum(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return np.round(total / 9).astype(np.uint8)


def perturb(kind, img, objs, w, rng):
    if kind == "blur":  # 3x3 box blur
        return box_blur(img)
    if kind == "shift":  # the whole image by 1 px
        moves = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]
        return synth.shifted(img, *rng.choice(moves))
    if kind == "scale":  # every color dimmed (down to 30%) or brightened (up to 125%)
        return np.clip(img * rng.uniform(0.3, 1.25), 0, 255).round().astype(np.uint8)
    if kind == "noise":  # Gaussian, sigma up to 32
        sigma = rng.choice((8, 16, 24, 32))
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, sigma, img.shape)
        return np.clip(img + noise, 0, 255).round().astype(np.uint8)
    img = img.copy()  # erase 1-4 pixels of every object
    c = w.cell
    for o in objs:
        ys, xs = np.nonzero(synth.templates(w)[o.shape, o.size])
        for i in rng.sample(range(len(ys)), rng.randint(1, 4)):
            img[o.row * c + ys[i], o.col * c + xs[i]] = 0
    return img


@pytest.mark.parametrize("world", WORLDS)
def test_perturbed_cells_are_read_right_or_rejected_never_misread(world):
    w = synth.WORLDS[world]
    rng = random.Random(0)
    outcome = collections.Counter()
    for i in range(750):
        kind = ("blur", "erase", "shift", "scale", "noise")[i % 5]
        objs = synth.Scene.of(synth.rand_scene(rng, w, "test_ood")).objects
        got = synth.parse(perturb(kind, synth.render(objs, w), objs, w, rng), w)
        truth = {(o.row, o.col): o for o in objs}
        read = {(o.row, o.col): o for o in got.objects}
        for cell in [(r, c) for r in range(w.grid) for c in range(w.grid)]:
            verdict = "rejected" if cell in got.malformed else \
                "right" if read.get(cell) == truth.get(cell) else "misread"
            outcome[kind, verdict, "object" if cell in truth else "empty"] += 1
            assert verdict != "misread", (kind, truth.get(cell), read.get(cell))
    objects = sum(n for (_, _, what), n in outcome.items() if what == "object")
    assert objects > 2000
    for kind in ("erase", "shift", "noise"):  # mild: nearly always read right
        assert outcome[kind, "right", "object"] > 0.95 * objects / 5 * 0.9, (kind, outcome)
    for kind in ("blur", "scale"):  # harsh: read right or rejected, but read right often enough
        assert outcome[kind, "right", "object"] > 0.35 * objects / 5 * 0.9, (kind, outcome)


@pytest.mark.parametrize("world", WORLDS)
def test_vqa_answers_match_the_image(world):
    for s in samples(world, "vqa", n=400):
        objs = synth.parse(s["image"], world).objects
        assert synth.answer(s["program"], objs) == s["answer"]
        assert synth.question_text(s["program"]) == s["text"]
        if s["family"].startswith("query_"):  # the question never names its own answer
            assert s["answer"] not in s["text"].lower().split()


def test_vqa_answers_balanced_within_each_family():
    by_family = collections.defaultdict(collections.Counter)
    for i in range(3000):
        s = synth.make_sample("default", "vqa", "train", i)
        by_family[s["family"]][s["answer"]] += 1
    assert len(by_family) >= 12
    for fam, counts in by_family.items():
        assert max(counts.values()) <= 1.5 * sum(counts.values()) / len(counts), (fam, counts)


@pytest.mark.parametrize("world", WORLDS)
def test_t2i_targets_satisfy_geneval_and_hold_exactly_what_the_prompt_describes(world):
    w = synth.WORLDS[world]
    fams = collections.Counter()
    for s in samples(world, "t2i", n=300):
        fams[s["family"]] += 1
        scene = synth.parse(s["target"], world)
        assert synth.holds_exactly(s["describes"], scene), s["text"]
        assert not synth.holds_exactly(s["describes"], synth.Scene(()))  # a blank one never does
        if s["family"] == "scene":
            assert s["geneval"] is None and len(s["describes"]) == len(s["target_scene"])
        else:
            assert synth.geneval_holds(s["geneval"], scene.objects, w), s["text"]
            assert not synth.geneval_holds(s["geneval"], (), w)
    assert set(fams) == set(synth.T2I_FAMILIES)


def test_geneval_position_needs_the_direction_to_dominate():
    w = synth.WORLDS["tiny"]
    o = lambda r, c, size="large": synth.Obj("circle", "red", size, r, c)
    assert synth.relations(o(1, 0), o(1, 2), w) == {"left of"}
    assert synth.relations(o(0, 1), o(2, 1), w) == {"above"}
    assert synth.relations(o(0, 0), o(1, 1), w) == {"left of", "above"}  # a diagonal is both
    assert synth.relations(o(0, 0), o(2, 1), w) == {"above"}  # 2 rows up, 1 column left: above only
    assert synth.relations(o(1, 1), o(1, 1, "small"), w) == set()  # same centre: no relation
    # GenEval judges the most salient object of each class: here the large square, which is not left
    square, circle = {"shape": "square"}, {"shape": "circle"}
    geneval = {"include": [{**circle, "count": 1},
                           {**square, "count": 1, "position": ["left of", 0]}], "exclude": []}
    objs = [synth.Obj("square", "red", "small", 0, 0), synth.Obj("square", "red", "large", 0, 3),
            synth.Obj("circle", "blue", "large", 0, 2)]
    assert not synth.geneval_holds(geneval, objs, w)
    assert synth.geneval_holds(geneval, objs[:1] + objs[2:], w)


def check_edit(s, world):
    """The edit's semantics, read from the images, not from the generator's own code."""
    src, tgt = synth.parse(s["image"], world), synth.parse(s["target"], world)
    assert tgt.to_json() == s["target_scene"] and src.to_json() == s["scene"]
    atoms = s["edit"]["atoms"]
    touched = {tuple(c) for a in atoms for c in a["cells"] + ([a["to"]] if "to" in a else [])}
    before = {(o.row, o.col): o for o in src.objects}
    after = {(o.row, o.col): o for o in tgt.objects}
    for cell in set(before) | set(after):
        if cell not in touched:
            assert before.get(cell) == after.get(cell), (s["text"], cell)
    delta = sum(len(a["cells"]) * {"add": 1, "remove": -1}.get(a["op"], 0) for a in atoms)
    assert len(after) - len(before) == delta
    if len(atoms) == 1 and atoms[0]["op"] in synth.CHANGE:
        attr = synth.CHANGE[atoms[0]["op"]]
        for c in atoms[0]["cells"]:
            assert getattr(after[tuple(c)], attr) == atoms[0]["value"] != getattr(before[tuple(c)], attr)
    if not atoms:
        assert np.array_equal(s["image"], s["target"])
    else:
        assert not np.array_equal(s["image"], s["target"])


@pytest.mark.parametrize("world", WORLDS)
def test_simple_edits(world):
    fams = collections.Counter()
    for s in samples(world, "edit", n=300):
        fams[s["family"]] += 1
        check_edit(s, world)
        assert s["level"] == 0 and len(s["edit"]["atoms"]) == 1
        assert s["edit"]["atoms"][0]["op"] == s["family"]
    assert set(fams) == set(synth.EDIT_FAMILIES)


@pytest.mark.parametrize("world", WORLDS)
def test_intelligent_edits(world):
    levels, noops = collections.Counter(), 0
    for s in samples(world, "uniedit", n=600):
        check_edit(s, world)
        levels[s["level"]] += 1
        probe = s["probe"]
        # the probe is the VQA program embedded in the instruction, answered on the source image
        assert synth.answer(probe["program"], synth.parse(s["image"], world).objects) == probe["answer"]
        assert probe["question"] == synth.question_text(probe["program"])
        e = s["edit"]
        if e["branch"] is not None:  # the branch taken agrees with the answer to the probe
            assert e["branch"] == (probe["answer"] == e["if_answer"])
            if probe["program"][0] != "compare":  # "If it is red" / "If there are exactly 2"
                assert e["if_answer"] in s["text"]
            if not e["branch"] and "otherwise leave" in s["text"]:
                assert not e["atoms"]
        noops += not e["atoms"]
        # the edit redone from the probe's true answer is the target (other answers: test_eval)
        implied = synth.implied_target(s, probe["answer"], world)
        if e["if_answer"] is None and e["answer_sets"] is None:
            assert implied is None  # location and quantified edits act alike whatever the answer
        else:
            assert implied == s["target_scene"], s["text"]
        outside = re.sub(r"[Ii]f [^,]*,", "", s["text"]).lower()  # the answer may only sit in a condition
        if probe["program"][0] == "count" or probe["program"][2][0] == "the":
            assert probe["answer"] not in re.findall(r"[a-z0-9]+", outside), s["text"]
    assert set(levels) == {0, 1, 2, 3}
    assert 0.10 <= noops / 600 <= 0.20


def test_splits_hold_out_combinations_and_counts():
    w = synth.WORLDS["default"]
    for task in synth.TASKS:
        for split in ("train", "val"):
            for s in samples(w, task, split, n=150):
                for img in (s["image"], s["target"]):
                    if img is not None:
                        objs = synth.parse(img, w).objects
                        assert len(objs) <= w.max_objects
                        assert not any((o.shape, o.color) in w.heldout for o in objs)
                assert not any(f"{c} {sh}" in s["text"] for sh, c in w.heldout)
        assert all(synth.is_ood(s, w) for s in samples(w, task, "test_ood", n=50))


def test_tokenizer_round_trips_every_text():
    tok = synth.get_tokenizer("default")
    assert [tok.token_to_id(t) for t in synth.SPECIALS] == list(range(len(synth.SPECIALS)))
    for task in synth.TASKS:
        for split in synth.SPLITS:
            for s in samples("default", task, split, n=100):
                for text in (s["text"], s["answer"], s["probe"] and s["probe"]["question"]):
                    if text:
                        ids = tok.encode(text).ids
                        assert synth.SPECIALS.index("[UNK]") not in ids
                        assert tok.decode(ids) == text


def test_punctuation_never_merges_into_a_word_or_number():
    # "row 1," "row 1;" and "row 1." must share the token of "1", as "circle." shares "circle"
    tok = synth.get_tokenizer("tiny")
    for text in ("Move it to row 1, column 2.", "row 1; column 2", "Is it in row 1?"):
        tokens = tok.encode(text).tokens
        assert "▁1" in tokens and not any(t[-1] in ",;.?" and len(t) > 1 for t in tokens)
    assert tok.encode("a circle.").tokens[:2] == tok.encode("a circle to").tokens[:2]


def read_folder(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_dataset_is_deterministic_and_reads_back(tmp_path):
    a = synth.write_dataset(str(tmp_path / "a"), 300, "tiny", seed=1, workers=1)
    b = synth.write_dataset(str(tmp_path / "b"), 300, "tiny", seed=1, workers=2)
    c = synth.write_dataset(str(tmp_path / "c"), 300, "tiny", seed=2, workers=1)
    assert read_folder(a) == read_folder(b)
    assert read_folder(a)["samples.jsonl"] != read_folder(c)["samples.jsonl"]
    ds = synth.Dataset(a)
    assert {ds[i]["split"] for i in range(len(ds))} == set(synth.SPLITS)
    for i in range(0, 300, 7):
        got = ds[i]
        want = synth.make_sample("tiny", got["task"], got["split"], i, seed=1)
        assert got.keys() == want.keys()
        for k in want:
            if k in ("image", "target") and want[k] is not None:
                assert np.array_equal(got[k], want[k])
            else:
                assert got[k] == want[k], k


def run_cli(*args):
    return subprocess.run([sys.executable, "synth.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_bad_input_gets_a_one_line_error(tmp_path):
    for args, msg in [(["--out", str(tmp_path / "x"), "--world", "huge"], "unknown world"),
                      (["--out", str(tmp_path / "x"), "--tasks", "vqa,draw"], "unknown task"),
                      (["--out", str(tmp_path / "x"), "--preset", "uniedit-1m"], "unknown preset"),
                      (["--out", str(tmp_path / "x"), "--n", "0"], "positive integer"),
                      (["--out", str(tmp_path / "x"), "--n", "ten"], "positive integer")]:
        r = run_cli(*args)
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    r = run_cli("--out", str(keep), "--n", "5")
    assert r.returncode != 0 and "not empty" in r.stderr
    assert os.listdir(keep) == ["notes.txt"]
    with pytest.raises(ValueError, match="unknown split"):
        synth.make_sample("tiny", "vqa", "dev", 0)


def test_no_tasks_or_an_unwritable_output_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for args, msg in [(["--out", str(tmp_path / "none"), "--tasks", ","], "--tasks names no task"),
                      (["--out", str(afile / "d"), "--n", "5"],
                       f"cannot write the dataset folder's file {afile}"),
                      (["--show", "--n", "2", "--png", str(afile / "sheet.png")],
                       f"cannot write the contact sheet {afile}/sheet.png")]:
        r = run_cli(*args)
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "none").exists()  # nothing left behind


def test_a_bad_record_names_its_file_and_line(tmp_path):
    path = synth.write_dataset(str(tmp_path / "d"), 12, "tiny", workers=1)
    jsonl = os.path.join(path, "samples.jsonl")
    lines = open(jsonl).read().splitlines()
    lines[6] = lines[6][:40]
    open(jsonl, "w").write("\n".join(lines) + "\n")
    ds = synth.Dataset(path)
    assert ds[5]["index"] == 5
    for read in (lambda: ds[6], ds.records):
        with pytest.raises(ValueError, match=f"{jsonl} line 7 is not valid JSON"):
            read()


def test_corrupt_dataset_is_refused(tmp_path):
    path = synth.write_dataset(str(tmp_path / "d"), 40, "tiny", workers=1)
    lines = open(os.path.join(path, "samples.jsonl")).read().splitlines()
    with open(os.path.join(path, "samples.jsonl"), "w") as f:
        f.write("\n".join(lines[:30]) + "\n")
    with pytest.raises(ValueError, match="samples.jsonl has 30 records"):
        synth.Dataset(path)
    with open(os.path.join(path, "images.npy"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="corrupt"):
        synth.Dataset(path)
    meta = json.load(open(os.path.join(path, "meta.json")))  # a dataset of the 32 px world
    json.dump({**meta, "version": 1, "world": {**meta["world"], "side_px": [["large", 7]]}},
              open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(ValueError, match="format version 1 but this synth.py reads 2"):
        synth.Dataset(path)
    os.remove(os.path.join(path, "meta.json"))
    r = run_cli("--show", path)
    assert r.returncode != 0 and "meta.json is missing" in r.stderr


def test_force_overwrites_only_its_own_files(tmp_path):
    path = tmp_path / "d"
    synth.write_dataset(str(path), 10, "tiny", workers=1)
    (path / "notes.txt").write_text("precious")
    r = run_cli("--out", str(path), "--n", "12", "--world", "tiny", "--force")
    assert r.returncode == 0, r.stderr
    assert (path / "notes.txt").read_text() == "precious"
    assert json.load(open(path / "meta.json"))["n"] == 12


def test_contact_sheet_on_the_fly(tmp_path):
    png = tmp_path / "sheet.png"
    r = run_cli("--show", "--world", "tiny", "--tasks", "uniedit", "--n", "4", "--png", str(png))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(png).size[1] > 4 * 32
