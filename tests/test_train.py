"""Tests of the training loop: python -m pytest tests/test_train.py -q

Runs use a narrow model (--width=64) and a handful of steps so the file stays fast on 2 cores, and the CPU
even where a GPU is present (exact resume and gloo DDP are CPU facts); the GPU tests at the end use CUDA."""
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval as ev
import kernels
import synth
import train
from model import collate, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--device=cpu", "--width=64", "--batch_size=8", "--micro_batch=8", "--max_steps=4", "--warmup=2",
        "--log_every=1", "--save_every=2", "--eval_every=0"]


def run(tmp_path, *args):
    return train.main(FAST + [f"--out_dir={tmp_path}", *args])


def losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: (r.get("ce"), r.get("flow")) for r in recs if "grad_norm" in r}


def test_parse_args_types_unknown_keys_and_help():
    cfg = train.parse_args(["--preset=small", "--lr=0.01", "--mot=1", "--max_steps=7", "--name=x"])
    assert (cfg.world, cfg.lr, cfg.mot, cfg.max_steps, cfg.name, cfg.batch_size) == ("default", 0.01, True, 7, "x", 256)
    with pytest.raises(ValueError, match="unknown key 'lrate'.*valid keys: preset"):
        train.parse_args(["--lrate=1"])
    with pytest.raises(ValueError, match="--max_steps='ten' is not a valid int"):
        train.parse_args(["--max_steps=ten"])
    with pytest.raises(ValueError, match="--mot='maybe' is not a valid bool"):
        train.parse_args(["--mot=maybe"])
    with pytest.raises(ValueError, match="unknown recipe"):
        train.parse_args(["--recipe=magic"])
    assert train.parse_args(["--lr", "0.1", "--mot", "1"]) == train.parse_args(["--lr=0.1", "--mot=1"])
    with pytest.raises(ValueError, match="not --key=value"):
        train.parse_args(["lr=0.1"])
    with pytest.raises(ValueError, match="--lr needs a value"):
        train.parse_args(["--lr"])
    r = subprocess.run([sys.executable, "train.py", "-h"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--max_steps=3600" in r.stdout and "--recipe='pretrain'" in r.stdout
    r = subprocess.run([sys.executable, "train.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown key 'bogus'") and r.stderr.count("\n") == 1


# One out-of-range value per numeric key of TrainConfig, and what the error says the key must be.
BAD = [("seed", -1, ">= 0"), ("num_workers", -1, ">= 0"), ("batch_size", 0, ">= 1"),
       ("batch_size", -32, ">= 1"), ("micro_batch", 0, ">= 1"), ("max_steps", -5, ">= 1"),
       ("lr", math.nan, ">= 0"), ("lr", math.inf, ">= 0"), ("gen_lr_scale", -1.0, ">= 0"),
       ("min_lr", -1e-5, ">= 0"),
       ("warmup", -1, ">= 0"), ("weight_decay", -0.1, ">= 0"), ("beta2", 1.0, "in [0, 1)"),
       ("grad_clip", -1.0, ">= 0 (0: no clipping)"), ("ema", 2.0, "in [0, 1)"),
       ("ema", 1.0, "in [0, 1)"),
       ("width", 16, "0 (the preset's) or >= 32"), ("refiner_layers", -1, ">= 0"),
       ("src_pixel_dropout", 1.5, "-1 (the recipe's) or in [0, 1]"),
       ("compile", 2, "-1 (on CUDA only), 0 or 1"), ("bench", -5, ">= 0"),
       ("log_every", -1, ">= 0 (0: a line at checkpoints only)"),
       ("eval_every", -1, ">= 0 (0: never)"),
       ("save_every", -1, ">= 0 (0: the final checkpoint only)"),
       ("keep", -1, ">= 0 (0: keep all)"),
       ("peak_tflops", math.nan, ">= 0 (0: measured)")]


@pytest.mark.parametrize("key, value, must", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_an_out_of_range_key_is_refused_naming_key_value_and_range(key, value, must):
    with pytest.raises(ValueError) as e:
        train.check_config(train.TrainConfig(**{key: value}))
    assert str(e.value) == f"--{key}={value} is out of range: it must be {must}"


def test_every_numeric_key_has_a_range_and_the_edges_and_zeros_pass():
    fields = train.dataclasses.fields(train.TrainConfig)
    numeric = {f.name for f in fields if f.type in (int, float)}
    assert set(train.VALID) == numeric == {key for key, _, _ in BAD}
    edges = [("ema", 0.0), ("beta2", 0.0), ("keep", 0), ("grad_clip", 0.0), ("save_every", 0),
             ("log_every", 0), ("width", 32), ("src_pixel_dropout", -1.0),
             ("src_pixel_dropout", 1.0), ("compile", -1), ("lr", 0.0), ("min_lr", 0.0),
             ("gen_lr_scale", 0.0)]
    for key, value in edges:
        train.check_config(train.TrainConfig(**{"min_lr": 0.0, key: value}))


@pytest.mark.parametrize("overrides, error", [
    (dict(min_lr=1e-3, lr=1e-4), r"--min_lr=0.001 is out of range: it must be in \[0, lr=0.0001\]"),
    (dict(mix="vqa:2,t2i:-1"), "--mix=vqa:2,t2i:-1: the weight of t2i is '-1'; it must be a"),
    (dict(mix="vqa:x"), "the weight of vqa is 'x'"),
    (dict(device="nope"), "--device=nope is not a device: use cpu, cuda or cuda:N"),
    (dict(device="meta"), "--device=meta: train.py runs on cpu or cuda"),
    (dict(device="cuda:99"), r"--device=cuda:99, but this machine has \d+ CUDA GPU\(s\)"),
    (dict(model="depth=6,dpth=2"), "--model names unknown UMMConfig key 'dpth'; valid keys: width,"),
    (dict(model="t_mean=high"), "--t_mean='high' is not a valid float"),
], ids=["min_lr>lr", "negative mix weight", "mix weight not a number", "no such device", "meta",
        "cuda:99", "unknown model key", "model value of the wrong type"])
def test_other_bad_keys_are_refused_before_anything_runs(overrides, error):
    with pytest.raises(ValueError, match=error):
        train.check_config(train.TrainConfig(**overrides))


def test_model_keys_reach_the_model_config_typed_and_win_over_the_recipe():
    cfg = train.parse_args(["--recipe=uniedit", "--model=depth=6,t_mean=0.5,gen_cell_weight=2,mot=1"])
    mc = train.model_config(cfg, vocab_size=50)
    assert (mc.depth, mc.t_mean, mc.gen_cell_weight, mc.mot) == (6, 0.5, 2.0, True)
    assert (mc.ce_weight, mc.sem_cell_weight) == (0.0, 0.0)  # the recipe's, where no key overrides them
    # pretraining weighs the answers 0.1 (README, "How hard each task pulls"); a key restores 1
    assert train.model_config(train.parse_args([]), vocab_size=50).ce_weight == 0.1
    assert train.model_config(train.parse_args(["--model=ce_weight=1"]), vocab_size=50).ce_weight == 1.0


def test_nan_loss_stops_the_run_with_one_line_and_no_traceback(tmp_path, monkeypatch):
    args = FAST + [f"--out_dir={tmp_path}", "--lr=1e9", "--min_lr=0", "--warmup=0"]  # NaN at step 2
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as e:  # `python train.py ...`, in this process
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    msg = e.value.code  # what Python prints to stderr, alone, before it exits with status 1
    assert msg.startswith("error: loss is nan at step 2; the run stopped before updating") and (
        "\n" not in msg)
    assert not train.checkpoints(tmp_path / "pretrain")


def test_zero_means_final_checkpoint_only_checkpoint_lines_only_and_no_clipping(tmp_path):
    zero = run(tmp_path, "--name=zero", "--max_steps=3", "--save_every=0", "--log_every=0",
               "--grad_clip=0")
    assert sorted(os.listdir(zero)) == ["log.jsonl", "speed.jsonl", "step_000003"]
    assert list(losses(zero)) == [3]
    huge = run(tmp_path, "--name=huge", "--max_steps=3", "--grad_clip=1e30")  # no gradient's size
    clipped = run(tmp_path, "--name=clip", "--max_steps=3")  # gradients above 1, the default clip
    a, b, c = (load_file(os.path.join(d, "step_000003/model.safetensors"))
               for d in (zero, huge, clipped))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoints_are_ordered_and_pruned_by_step_number(tmp_path):
    for step in (999_998, 999_999):
        os.makedirs(tmp_path / f"step_{step}")
        (tmp_path / f"step_{step}" / "config.json").write_text("{}")
    model = torch.nn.Linear(2, 2)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    tok = synth.get_tokenizer("tiny")
    train.save_checkpoint(str(tmp_path), 1_000_000, model, ema, opt, {}, tok, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_1000000", "step_999999"]  # by name: 1000000 first
    assert train.newest_checkpoint(str(tmp_path)).endswith("step_1000000")
    train.save_checkpoint(str(tmp_path), 1_000_001, model, ema, opt, {}, tok, keep=0)  # 0 keeps all
    assert len(train.checkpoints(tmp_path)) == 3


def test_resume_refuses_another_stream_or_corrupt_ema_and_says_when_finished(tmp_path, capsys):
    run_dir = run(tmp_path, "--name=r")
    assert run(tmp_path, "--name=r", "--resume=1") == run_dir
    assert f"run {run_dir} has finished" in capsys.readouterr().out
    shutil.rmtree(os.path.join(run_dir, "step_000004"))  # as if it stopped after checkpoint 2
    for arg in ("--micro_batch=4", "--max_steps=6", "--seed=1", "--mix=vqa:1"):
        key = arg[2:].partition("=")[0]
        with pytest.raises(ValueError, match=f"has {key}=.*, this run {key}=.*: resume with the"):
            run(tmp_path, "--name=r", "--resume=1", arg)
    with open(os.path.join(run_dir, "step_000002", "ema.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"step_000002/ema.safetensors is missing or corrupt"):
        run(tmp_path, "--name=r", "--resume=1")


def test_a_log_without_checkpoint_refuses_a_new_run_and_resume_starts_it_over(tmp_path):
    fresh = run(tmp_path, "--name=fresh", "--max_steps=2")
    died = tmp_path / "died"
    died.mkdir()
    (died / "log.jsonl").write_text('{"step": 1, "ce": 9.0}\n{"step": 2, "ce"')  # died mid-line
    with pytest.raises(ValueError, match="holds the log of a run that died before its first one"):
        run(tmp_path, "--name=died", "--max_steps=2")
    run(tmp_path, "--name=died", "--max_steps=2", "--resume=1")
    assert (died / "log.jsonl").read_text() == open(os.path.join(fresh, "log.jsonl")).read()
    with pytest.raises(ValueError, match="--resume: no complete checkpoint in"):
        run(tmp_path, "--name=nothing", "--resume=1")
    assert not (tmp_path / "nothing").exists()


def test_a_run_folder_is_held_by_one_live_process(tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "log.jsonl").write_text('{"step": 1}\n')  # a run in its first steps ...
    host = socket.gethostname()
    (held / "lock").write_text(f"{os.getppid()} {host}\n")  # ... by a live process: pytest's parent
    for resume in ("--resume=0", "--resume=1"):
        with pytest.raises(ValueError, match=rf"held by process {os.getppid()} on .*: wait for"):
            run(tmp_path, "--name=held", "--max_steps=1", resume)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (held / "lock").write_text(f"{gone} {host}\n")  # its process has ended
    run(tmp_path, "--name=held", "--max_steps=1", "--resume=1")  # takes the lock over; starts over
    assert not (held / "lock").exists() and train.newest_checkpoint(held)  # given up at the end
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write the run folder .*file/pretrain .*: pass a "):
        run(tmp_path / "file")


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = run(tmp_path, "--name=full", "--log_every=3")  # lines at 2, 3, 4: checkpoints close one
    real_save = train.save_checkpoint

    def save_then_die(run_dir, step, *a):
        out = real_save(run_dir, step, *a)
        if step == 2:
            raise KeyboardInterrupt  # killed right after the mid-run checkpoint
        return out
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--name=cut", "--log_every=3")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="already holds checkpoints"):  # nothing is overwritten by accident
        run(tmp_path, "--name=cut", "--log_every=3")
    cut = run(tmp_path, "--name=cut", "--log_every=3", "--resume=1", "--num_workers=2")  # 2 workers
    logs = [open(os.path.join(d, "log.jsonl")).read() for d in (full, cut)]
    assert logs[0] == logs[1]
    for name in ("model", "ema"):  # the weights, and the EMA that eval and sampling use
        a, b = (load_file(os.path.join(d, f"step_000004/{name}.safetensors")) for d in (full, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    real = train.save_file
    calls = []

    def flaky(tensors, path):
        calls.append(path)
        if "step_000004" in path:
            raise OSError("disk full")
        return real(tensors, path)
    monkeypatch.setattr(train, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "--name=r")
    run_dir = os.path.join(tmp_path, "r")
    assert train.newest_checkpoint(run_dir).endswith("step_000002")
    monkeypatch.setattr(train, "save_file", real)
    resumed = run(tmp_path, "--name=r", "--resume=1")
    assert train.newest_checkpoint(resumed).endswith("step_000004")


def test_sigkill_in_a_checkpoint_write_and_mid_run_then_resumes_equal_the_unstopped_run(tmp_path):
    # lines at 3, 4, 6, 8, 9, 10 (every 3 steps and at each checkpoint); checkpoints at 4, 8, 10
    args = FAST + ["--micro_batch=4", "--max_steps=10", "--log_every=3", "--save_every=4",
                   "--keep=1", f"--out_dir={tmp_path}"]
    full = run(tmp_path, *args[len(FAST):], "--name=full")
    cmd = [sys.executable, "train.py", *args, "--name=cut"]
    cut = tmp_path / "cut"
    # 1. killed inside the write of checkpoint 8, after its model.safetensors
    env = {**os.environ, "NANOUMM_TEST_KILL_IN_SAVE": "8"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert os.listdir(cut / ".tmp_step_000008") == ["model.safetensors"]
    assert train.newest_checkpoint(cut).endswith("step_000004")
    assert list(losses(cut)) == [3, 4, 6, 8]  # logged past the checkpoint: cut back on resume
    # 2. resumed, and killed from outside as soon as it logs step 6: between checkpoints
    unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd + ["--resume=1"], cwd=ROOT, env=unbuffered, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("step      6 "):
            p.kill()
            break
    assert p.wait() == -signal.SIGKILL
    # 3. resumed to the end (in this process: it takes over the dead process's lock)
    run(tmp_path, *args[len(FAST):], "--name=cut", "--resume=1")
    # no lock, no half-written checkpoint; the same bytes as the run that never stopped
    assert sorted(os.listdir(cut)) == ["log.jsonl", "speed.jsonl", "step_000010"]
    last = ["step_000010/" + f for f in ("model.safetensors", "ema.safetensors", "optim.pt")]
    for name in ["log.jsonl", *last]:
        assert (cut / name).read_bytes() == open(os.path.join(full, name), "rb").read(), name


def test_an_mfu_over_100_percent_is_measured_again_or_printed_as_a_wrong_peak(tmp_path, monkeypatch,
                                                                             capsys):
    real, slow = kernels.timings, [1000]  # how much slower the machine is when the peak is timed

    def busy(fn, device, repeats):
        factor = slow.pop(0) if slow else 1
        return [t * factor for t in real(fn, device, repeats)]
    monkeypatch.setattr(kernels, "timings", busy)
    kernels._matmul_flops.cache_clear()
    run_dir = run(tmp_path, "--name=quieter", "--max_steps=1")  # busy at the start only
    out = capsys.readouterr().out
    low = float(out.split("MFU against ")[1].split(" TFLOP/s")[0])
    speed = json.loads(open(os.path.join(run_dir, "speed.jsonl")).readline())
    assert speed["peak_tflops"] > 100 * low and 0 < speed["mfu"] <= 1 and "over 100%" not in out
    slow[:] = [1000, 1000]  # busy at the start and when measured again
    kernels._matmul_flops.cache_clear()
    run(tmp_path, "--name=busy", "--max_steps=1")
    kernels._matmul_flops.cache_clear()
    out = capsys.readouterr().out
    assert "(over 100%: the peak it divides by is wrong; measured twice, low twice)" in out


def test_recipes_init_from_and_flow_only_uniedit(tmp_path):
    base = run(tmp_path, "--name=base", "--recipe=staged", "--max_steps=6", "--save_every=6")
    stages = [json.loads(x).get("stage") for x in open(os.path.join(base, "log.jsonl"))]
    assert stages[:6] == [0, 0, 1, 1, 2, 2]  # understanding, then generation, then joint
    ema = load_file(os.path.join(base, "step_000006/ema.safetensors"))
    for recipe in ("uniedit", "simple_edit", "mixed"):
        out = run(tmp_path, f"--name={recipe}", f"--recipe={recipe}", f"--init_from={base}", "--max_steps=2")
        recs = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
        assert all(r["flow"] > 0 for r in recs)
        assert ("ce" in recs[0]) == (recipe == "mixed")  # uniedit and simple edits train the flow head alone
        # Uni-Edit's loss is the flow loss alone; the other recipes keep the per-cell attribute losses
        assert ("sem_cells" in recs[0] and "gen_cells" in recs[0]) == (recipe != "uniedit")
    with pytest.raises(ValueError, match="pass --init_from"):
        run(tmp_path, "--name=x", "--recipe=uniedit")
    # --init_from loads the EMA weights: a run with lr 0 keeps them
    out = run(tmp_path, "--name=frozen", "--recipe=mixed", f"--init_from={base}", "--max_steps=1", "--lr=0",
              "--min_lr=0", "--weight_decay=0", "--save_every=1")
    got = load_file(os.path.join(out, "step_000001/model.safetensors"))
    assert all(torch.equal(got[k], ema[k]) for k in got)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    base = run(tmp_path, "--name=base", "--max_steps=2")
    ckpt = os.path.join(base, "step_000002")
    with pytest.raises(ValueError, match="has shape .* this model needs"):
        run(tmp_path, "--name=wide", "--recipe=mixed", f"--init_from={ckpt}", "--width=128")
    with open(os.path.join(ckpt, "ema.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"ema.safetensors is missing or corrupt"):
        run(tmp_path, "--name=t", "--recipe=mixed", f"--init_from={ckpt}")
    with pytest.raises(ValueError, match="no checkpoint there"):
        run(tmp_path, "--name=t2", "--recipe=mixed", f"--init_from={tmp_path}/nothing")


def torchrun(ranks, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_micro_batch_adapts_to_the_number_of_ranks():
    pretrain, staged = ["vqa:2,t2i:1,edit:1"], [mix for _, mix in train.RECIPES["staged"]["stages"]]
    assert train.plan_micro_batch(32, 32, 1, pretrain) == (32, 1)
    assert train.plan_micro_batch(32, 32, 2, pretrain) == (16, 1)  # the tiny default on 2 ranks
    assert train.plan_micro_batch(32, 8, 2, pretrain) == (8, 2)  # the largest micro-batch <= the asked one
    assert train.plan_micro_batch(256, 64, 8, pretrain) == (32, 1)  # --preset=small on 8 GPUs
    assert train.plan_micro_batch(30, 32, 3, pretrain) == (10, 1)
    assert train.plan_micro_batch(32, 32, 4, staged) == (8, 1)
    with pytest.raises(ValueError, match=r"over 3 ranks: use --batch_size=30 or --batch_size=33$"):
        train.plan_micro_batch(32, 32, 3, pretrain)
    with pytest.raises(ValueError, match=r"over 6 ranks: use --batch_size=510 or --batch_size=516$"):
        train.plan_micro_batch(512, 64, 6, pretrain)
    # micro-batches of 2 would hold no edit sample: the recipe would silently lose a task
    with pytest.raises(ValueError, match=r"over 4 ranks: use --batch_size=12$"):
        train.plan_micro_batch(8, 8, 4, pretrain)
    with pytest.raises(ValueError, match=r"micro_batch=2 is too small .* raise --micro_batch"):
        train.plan_micro_batch(32, 2, 1, pretrain)


def test_one_two_and_four_ranks_give_the_same_losses_and_weights(tmp_path):
    args = FAST + ["--batch_size=16", "--micro_batch=4", "--max_steps=2", f"--out_dir={tmp_path}"]
    for ranks in (1, 2, 4):  # accumulation 4, 2 and 1 over the same 4 micro-batches per step
        r = torchrun(ranks, *args, f"--name=r{ranks}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"micro-batch 4 x {ranks} rank(s) x accumulation {4 // ranks}" in r.stdout
        if ranks > 1:  # the pretrain recipe reaches every parameter: DDP needs no search for unused ones
            assert "find_unused_parameters=False" in r.stdout
            assert "find_unused_parameters=True" not in r.stderr
    one = losses(tmp_path / "r1")
    a = load_file(str(tmp_path / "r1/step_000002/model.safetensors"))
    for ranks in (2, 4):
        other = losses(tmp_path / f"r{ranks}")
        for step in one:
            assert one[step] == pytest.approx(other[step], rel=1e-4)
        b = load_file(str(tmp_path / f"r{ranks}/step_000002/model.safetensors"))
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_torchrun_on_two_and_three_ranks_with_the_default_batch(tmp_path):
    args = ["--device=cpu", "--width=64", "--max_steps=1", "--eval_every=0", f"--out_dir={tmp_path}"]
    r = torchrun(3, *args, "--name=three")  # 32 samples cannot be split over 3 ranks: one line says what can
    assert r.returncode != 0
    assert r.stderr.splitlines()[0] == ("error: batch_size=32 cannot be split into micro-batches of at most 32 "
                                        "samples over 3 ranks: use --batch_size=30 or --batch_size=33")
    assert not (tmp_path / "three").exists()
    r = torchrun(3, *args, "--name=three", "--batch_size=30")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 30 = micro-batch 10 x 3 rank(s) x accumulation 1 (micro_batch 32 lowered to fit)" in r.stdout


def test_a_recipe_that_leaves_parameters_unused_freezes_them_and_runs_under_ddp(tmp_path, tiny_run):
    r = torchrun(2, "--device=cpu", "--width=64", "--recipe=uniedit", f"--init_from={tiny_run}", "--max_steps=2",
                 "--eval_every=0", "--save_every=2", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "frozen, as no task of the recipe reaches them: norm.weight, lm_head.weight" in r.stdout
    assert "find_unused_parameters=False" in r.stdout  # frozen by construction rather than searched for
    before = load_file(os.path.join(train.newest_checkpoint(tiny_run), "ema.safetensors"))
    after = load_file(str(tmp_path / "uniedit/step_000002/model.safetensors"))
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not torch.equal(before["to_pixels.weight"], after["to_pixels.weight"])


def test_only_a_recipe_whose_stages_reach_different_parameters_searches_for_unused_ones():
    cfg = train.parse_args(["--device=cpu", "--width=64"])
    tok = synth.get_tokenizer(cfg.world)
    mcfg = train.model_config(cfg, tok.get_vocab_size())
    torch.manual_seed(0)
    model = train.UMM(mcfg)
    staged = [mix for _, mix in train.RECIPES["staged"]["stages"]]
    vqa, gen = (train.reached_parameters(model, mix, cfg, tok, mcfg) for mix in staged[:2])
    assert "lm_head.weight" in vqa and "to_pixels.weight" not in vqa and "enc_in.weight" in vqa
    assert "to_pixels.weight" in gen and "lm_head.weight" not in gen
    assert train.freeze_unreached(model, staged, cfg, tok, mcfg) == ([], True)
    assert all(p.requires_grad for p in model.parameters())
    assert train.freeze_unreached(model, ["vqa:2,t2i:1,edit:1"], cfg, tok, mcfg) == ([], False)
    assert train.freeze_unreached(model, ["t2i:1"], cfg, tok, mcfg)[1] is False
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def test_compiled_step_equals_eager(tmp_path):
    # the noise is drawn outside the compiled loss, so both runs see the same draws
    eager = losses(run(tmp_path, "--name=eager", "--compile=0", "--max_steps=2"))
    compiled = losses(run(tmp_path, "--name=compiled", "--compile=1", "--max_steps=2"))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-5)


def test_bench_prints_one_table_row_and_saves_nothing(tmp_path, capsys):
    row = run(tmp_path, "--name=b", "--bench=2")
    assert row["tokens_per_s"] > 0 and row["images_per_s"] > 0 and row["ms_per_step"] > 0
    assert row["peak_mem_gib"] is None and row["recompiles"] == 0  # CPU: no CUDA memory stats
    # MFU divides by the measured fp32 matmul rate on the CPU: a FLOP count or a rate in the wrong unit
    # would put it outside (0, 1).
    assert row["peak_tflops"] == kernels.measured_matmul_flops(torch.device("cpu")) / 1e12
    assert 0 < row["mfu"] < 1
    assert "| tiny | eager + sdpa | cpu |" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()


def test_peak_tflops_overrides_the_measured_peak(tmp_path, capsys):
    measured = kernels.measured_matmul_flops(torch.device("cpu"))
    assert 1e9 < measured < 1e14  # fp32 GEMM on a CPU: GFLOP/s to tens of TFLOP/s
    # a 1 kFLOP/s "peak" is beaten even on a machine busy enough to make a step take seconds
    fast = run(tmp_path, "--name=b", "--bench=2", "--peak_tflops=1e-9")
    assert fast["peak_tflops"] == 1e-9 and fast["mfu"] > 1
    out = capsys.readouterr().out
    assert "MFU against 1e-09 TFLOP/s\n" in out  # no "(measured matmul)" when given
    wrong = "(over 100%: the peak it divides by is wrong; --peak_tflops is below this device's) |"
    assert wrong in out


def test_compiled_training_does_not_recompile_after_warmup(tmp_path):
    assert run(tmp_path, "--name=b", "--bench=3", "--compile=1")["recompiles"] == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = ["--preset=small", "--batch_size=64", "--micro_batch=32", "--warmup=2", "--eval_every=0", "--log_every=1"]


@cuda
def test_gpu_compiled_step_with_kernels_and_flex_does_not_recompile(tmp_path):
    row = train.main(GPU + [f"--out_dir={tmp_path}", "--bench=5", "--compile=1", "--kernels=1", "--flex=1"])
    assert row["recompiles"] == 0 and row["mfu"] > 0 and row["peak_mem_gib"] > 0


@cuda
def test_gpu_torchrun_nccl_one_rank_equals_plain_python(tmp_path):
    args = GPU + ["--max_steps=3", "--save_every=3", f"--out_dir={tmp_path}"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "train.py", *args, "--name=nccl"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "train.py", *args, "--name=one"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    one, nccl = losses(tmp_path / "one"), losses(tmp_path / "nccl")
    assert one.keys() == nccl.keys()
    for step in one:  # bf16 and compiled kernels: equal up to the nondeterminism of GPU reductions
        assert one[step] == pytest.approx(nccl[step], rel=2e-2)


def test_eval_during_training_writes_grid_table_and_log_line(tmp_path):
    run_dir = run(tmp_path, "--max_steps=2", "--eval_every=2")
    pic = np.array(Image.open(os.path.join(run_dir, "samples", "step_000002.png")))
    side = synth.get_world("tiny").size * ev.SCALE  # each image drawn at 2x, nearest-neighbour

    columns = [ev.GAP + k * (3 * side + 5 * ev.GAP) + j * (side + ev.GAP)
               for k in range(ev.PER_ROW) for j in range(3)]

    def shown(image):  # is the image in one of the picture's image columns, upscaled?
        return any(np.array_equal(pic[y:y + side:ev.SCALE, x:x + side:ev.SCALE], image)
                   for x in columns for y in range(pic.shape[0] - side))
    edit = synth.make_sample("tiny", "edit", "val", 0)  # the first simple edit: source and target
    assert side >= 96 and shown(edit["image"]) and shown(edit["target"])
    assert "| VQA accuracy |" in open(os.path.join(run_dir, "samples", "step_000002.md")).read()
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rec = json.loads(f.readlines()[-1])
    assert rec["step"] == 2 and 0 <= rec["val_vqa_acc"] <= 1 and 0 <= rec["val_shapeeval"] <= 1
    # the learning curves: one panel of losses, one of val scores, each series in its own colour
    curves = np.array(Image.open(os.path.join(run_dir, "curves.png")).convert("RGB"))
    assert curves.shape == (260, 420 * len(train.CURVES), 3)
    for color in train.COLORS:
        assert (curves == color).all(-1).any()  # every series' legend (and line) is drawn


def test_a_short_tiny_run_answers_color_questions_better_than_the_blind_chance_row(tmp_path):
    """A few hundred steps of the tiny world's VQA, from scratch: the model answers "what color is
    ..." questions far better than the blind chance row (the majority train answer to the same
    text), so it reads the image. Its bootstrap interval lies above the blind row's value."""
    run_dir = run(tmp_path, "--width=128", "--mix=vqa:1", "--batch_size=32", "--micro_batch=32", "--max_steps=800",
                  "--warmup=20", "--lr=1e-3", "--log_every=0", "--save_every=0")
    model, tok, world, _, _ = ev.load(run_dir)
    questions = [s for s in (synth.make_sample(world, "vqa", "val", i) for i in range(1500))
                 if s["family"] == "query_color"][:120]
    said = ev.answer(model, tok, questions)
    right = np.array([a == q["answer"] for a, q in zip(said, questions)], float)
    blind = np.mean([ev.blind_answer(q, world) == q["answer"] for q in questions])
    lo = np.percentile(right[np.random.default_rng(0).integers(0, len(right), (1000, len(right)))]
                       .mean(1), 2.5)
    assert lo > blind, (right.mean(), blind)


def test_unitoken_stage_one_trains_only_the_encoder_side_and_its_checkpoint_round_trips(tmp_path):
    out = run(tmp_path, "--name=u", "--recipe=unitoken", "--max_steps=20", "--keep=0")
    stages = [json.loads(x)["stage"] for x in open(os.path.join(out, "log.jsonl")) if "grad_norm" in x]
    assert stages == [0] * 2 + [1] * 14 + [2] * 4  # 10%, 70%, 20% of the steps
    cfg = train.parse_args(FAST + ["--recipe=unitoken"])
    mcfg = train.model_config(cfg, synth.get_tokenizer("tiny").get_vocab_size())
    assert mcfg.dual_tokens
    torch.manual_seed(0)  # the run's initial weights, as init_run makes them
    init = train.UMM(mcfg).state_dict()
    step = {s: load_file(os.path.join(out, f"step_{s:06d}/model.safetensors")) for s in (2, 4, 20)}
    encoder_side = {k for k in init if k.startswith(train.UNDERSTANDING_ENCODER)}
    assert {"enc_in.weight", "adapter.0.weight", "code_emb.weight", "sem_cells.weight"} <= encoder_side
    moved = {k for k in init if k != "codebook" and not torch.equal(step[2][k], init[k])}
    assert moved and moved <= encoder_side  # stage I: the trunk, LM head and flow head byte-equal
    assert not torch.equal(step[4]["blocks.0.und.qkv.weight"], init["blocks.0.und.qkv.weight"])  # stage II: all
    # the fitted codebook is saved with the weights and its EMA, unchanged by training
    ema = load_file(os.path.join(out, "step_000020/ema.safetensors"))
    assert (step[20]["codebook"].abs() <= 1).all(1).sum() == 71
    assert torch.equal(step[2]["codebook"], step[20]["codebook"]) and torch.equal(ema["codebook"], step[20]["codebook"])
    # load_checkpoint rebuilds the dual_tokens model with every saved tensor, the codebook included
    model, tok, meta = load_checkpoint(out, weights="model")
    assert model.cfg.dual_tokens and meta["step"] == 20
    assert all(torch.equal(v, step[20][k]) for k, v in model.state_dict().items())
    vqa = collate([synth.make_sample("tiny", "vqa", "val", i) for i in range(4)], model.cfg, tok)["vqa"]
    assert torch.equal(model.decode_codes(model.encode_codes(vqa["sem"])), vqa["sem"])
    assert model.generate_text(vqa).shape == (4, model.cfg.answer_len)


@pytest.mark.parametrize("mot", [0, 1])
def test_gen_lr_scale_sets_the_generation_sides_lr_apart(tmp_path, mot):
    """--gen_lr_scale multiplies the lr of GENERATION_SIDE (and MoT's `gen` experts) alone: at 0
    those weights stay byte-equal to the initial ones while the trunk and understanding side
    train; at 1 the run equals one without the key."""
    held = run(tmp_path, "--name=held", f"--mot={mot}", "--gen_lr_scale=0", "--keep=0")
    plain = run(tmp_path, "--name=plain", f"--mot={mot}", "--keep=0")
    one = run(tmp_path, "--name=one", f"--mot={mot}", "--gen_lr_scale=1", "--keep=0")
    cfg = train.parse_args(FAST + [f"--mot={mot}"])
    torch.manual_seed(0)  # the run's initial weights, as init_run makes them
    init = train.UMM(train.model_config(cfg, synth.get_tokenizer("tiny").get_vocab_size())).state_dict()
    end = load_file(os.path.join(held, "step_000004/model.safetensors"))
    gen = {k for k in init if train.generation_side(k)}
    assert {"to_pixels.weight", "pix_in.weight", "t_mlp.0.weight"} <= gen
    assert ("blocks.0.gen.qkv.weight" in gen) == bool(mot)
    assert not {k for k in init if k.startswith(("blocks.0.und.", "lm_head", "enc_in"))} & gen
    moved = {k for k in init if not torch.equal(end[k], init[k])}
    assert moved and not moved & gen  # the generation side byte-equal, the rest trained
    assert "blocks.0.und.qkv.weight" in moved and "lm_head.weight" in moved
    assert losses(one) == losses(plain)
    a, b = (load_file(os.path.join(d, "step_000004/model.safetensors")) for d in (one, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run takes this run's scale, not the one saved with the optimizer state
    shutil.rmtree(os.path.join(held, "step_000004"))
    run(tmp_path, "--name=held", f"--mot={mot}", "--gen_lr_scale=1", "--keep=0", "--resume=1")
    end = load_file(os.path.join(held, "step_000004/model.safetensors"))
    assert not torch.equal(end["to_pixels.weight"], init["to_pixels.weight"])
