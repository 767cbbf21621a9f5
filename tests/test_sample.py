"""Tests of sample.py: python -m pytest tests/test_sample.py -q

Each mode runs on a 2-step checkpoint of a narrow model (made once for the module) with 2 Euler steps;
every kind of bad input must end in a one-line error."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = synth.get_world("tiny")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run  # a run folder: sample.py takes its newest checkpoint


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(synth.make_sample(W, "edit", "val", 0)["image"]).save(path)
    return str(path)


def run(ckpt, tmp_path, *args):
    sample.main(["--ckpt", ckpt, "--steps", "2", "--out", str(tmp_path / "out"), *args])
    return tmp_path / "out"


def test_question(ckpt, tmp_path, png, capsys):
    run(ckpt, tmp_path, "--image", png, "--question", "What color is the circle?")
    out = capsys.readouterr().out
    assert out.startswith("Q: What color is the circle?\nA: ")
    run(ckpt, tmp_path, "--from_synth", "vqa:val:3")
    q = synth.make_sample(W, "vqa", "val", 3)
    assert f"Q: {q['text']}" in (out := capsys.readouterr().out) and f"(truth: {q['answer']})" in out


def test_prompt_writes_images_and_grid_deterministically(ckpt, tmp_path, capsys):
    out = run(ckpt, tmp_path, "--prompt", "A red square above a circle.", "--n", "3", "--seed", "5")
    files = sorted(os.listdir(out))
    assert files == ["gen_00.png", "gen_01.png", "gen_02.png", "grid.png"]
    first = np.array(Image.open(out / "gen_01.png"))
    assert first.shape == (W.size, W.size, 3)
    run(ckpt, tmp_path, "--prompt", "A red square above a circle.", "--n", "3", "--seed", "5")
    assert np.array_equal(first, np.array(Image.open(out / "gen_01.png")))  # same seed, same images
    run(ckpt, tmp_path, "--from_synth", "t2i:val:2", "--n", "2")
    assert "images hold exactly the prompt's objects" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["gen_00.png", "gen_01.png", "grid.png"]  # gen_02.png went


def test_a_grid_is_written_whole_or_not_at_all(ckpt, tmp_path, monkeypatch):
    out = run(ckpt, tmp_path, "--prompt", "A red circle.", "--n", "2")
    before = (out / "grid.png").read_bytes()
    real = Image.Image.save

    def disk_full_at_the_grid(im, path, *a, **k):
        if os.path.basename(path).startswith("grid.png"):
            open(path, "wb").write(b"\x89PNG cut short")
            raise OSError("disk full")
        return real(im, path, *a, **k)
    monkeypatch.setattr(Image.Image, "save", disk_full_at_the_grid)
    with pytest.raises(OSError, match="disk full"):
        run(ckpt, tmp_path, "--prompt", "A red circle.", "--n", "2", "--seed", "1")
    assert (out / "grid.png").read_bytes() == before  # the earlier grid, whole


def test_multi_round_edit_and_from_synth(ckpt, tmp_path, png, capsys):
    (tmp_path / "out").mkdir()
    for stale in ("step_3.png", "target.png", "step_000100.png"):  # the last: a training run's grid
        (tmp_path / "out" / stale).write_bytes(b"")
    out = run(ckpt, tmp_path, "--image", png, "--edit", "Remove the red circle.", "--edit", "Paint the square blue.")
    files = {"step_0.png", "step_1.png", "step_2.png", "strip.png", "step_000100.png"}
    assert set(os.listdir(out)) == files  # the earlier call's step_3.png and target.png went
    assert np.array_equal(np.array(Image.open(out / "step_0.png")), np.array(Image.open(png)))
    assert "round 2: Paint the square blue." in capsys.readouterr().out
    out = run(ckpt, tmp_path, "--from_synth", "uniedit:val:7", "--out", str(tmp_path / "ie"))
    assert "target.png" in os.listdir(tmp_path / "ie") and "edit " in capsys.readouterr().out


def test_torchrun_is_refused_with_one_line(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        run(ckpt, tmp_path, "--prompt", "A circle.")
    assert e.value.code == "error: sample.py runs as one process: start it with python, not torchrun"


def test_bad_input_gets_one_line_errors(ckpt, tmp_path, png):
    def error(*args, ck=ckpt):
        with pytest.raises(SystemExit) as e:
            run(ck, tmp_path, *args)
        msg = e.value.code
        assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
        return msg
    assert "no checkpoint at" in error("--prompt", "A circle.", ck=str(tmp_path / "nothing"))
    step = os.path.join(ckpt, "step_000002")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(step):
        (bad / f).write_bytes(open(os.path.join(step, f), "rb").read())
    (bad / "tokenizer.json").write_text("{not json")
    assert "tokenizer.json is missing or corrupt" in error("--prompt", "A circle.", ck=str(bad))
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((W.size, 48, 3), np.uint8)).save(big)
    q = "What color is the circle?"
    msg = f"is 48x{W.size} px, the model needs {W.size}x{W.size}: pass --resize"
    assert msg in error("--image", str(big), "--question", q)
    run(ckpt, tmp_path, "--image", str(big), "--resize", "--question", q)  # scaled, then answered
    assert "cannot read image" in error("--image", str(tmp_path / "missing.png"), "--question", "Is there a circle?")
    assert "word 'colour' is outside the model's vocabulary" in error("--image", png, "--question", "What colour is it?")
    assert "holds characters the tokenizer does not know" in error("--prompt", "A red circle!")
    assert "exceeds UMMConfig.t2i_text" in error("--prompt", " ".join(["a red circle in row 1, column 1;"] * 8))
    assert "not task:split:index" in error("--from_synth", "vqa:val")
    assert "unknown task" in error("--from_synth", "caption:val:1")
    assert "give one of --question, --prompt and --edit" in error("--prompt", "A circle.", "--question", q)
    assert "need --image" in error("--question", "Is there a circle?")
    nan_cfg = error("--prompt", "A circle.", "--cfg", "nan")
    assert "--cfg=nan is out of range: a guidance scale is >= 0" in nan_cfg
    assert "--bench -5 is out of range: it must be >= 0" in error("--bench", "-5")
    for flag in ("--prompt", "--question", "--edit"):
        assert f"{flag} is blank: give the text itself" in error("--image", png, flag, "  ")
    (tmp_path / "a_file").write_text("")
    assert "cannot be made (Not a directory): pass a writable folder" in error(
        "--prompt", "A circle.", "--out", str(tmp_path / "a_file" / "out"))


def test_an_unwritable_out_is_refused_before_any_compute(ckpt, tmp_path, monkeypatch):
    def no_compute(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")
    monkeypatch.setattr(sample.ev, "load", no_compute)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt, "--prompt", "A circle.", "--out", str(tmp_path / "a_file")])
    assert e.value.code.startswith(f"error: --out {tmp_path / 'a_file'} cannot be made (File")


def test_cli_entry_point(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--from_synth", "edit:val:1", "--steps", "1",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "strip.png") and "round 1:" in r.stdout
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and r.stderr == "error: give --question, --prompt, --edit or --from_synth\n"


def test_bench_times_answers_and_images(ckpt, capsys):
    r = sample.main(["--ckpt", ckpt, "--bench", "4", "--steps", "2"])
    assert r["answers_per_s"] > 0 and r["images_per_s"] > 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # sample.py's default device
    assert f"batch 4, {device}:" in capsys.readouterr().out
    assert sample.main(["--bench", "2", "--preset", "tiny", "--steps", "1"])["images_per_s"] > 0
    with pytest.raises(SystemExit) as e:
        sample.main(["--bench", "2", "--preset", "huge"])
    assert e.value.code == "error: --bench without --ckpt needs --preset tiny, small or base, got 'huge'"
