"""Tests of the training loop: python -m pytest tests/test_train.py -q

Runs use a narrow model (--width=64) and a handful of steps so the file stays fast on 2 cores, and the CPU
even where a GPU is present (exact resume and gloo DDP are CPU facts); the GPU tests at the end use CUDA."""
import json
import os
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
    assert r.returncode == 0 and "--max_steps=6000" in r.stdout and "--recipe='pretrain'" in r.stdout
    r = subprocess.run([sys.executable, "train.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown key 'bogus'") and r.stderr.count("\n") == 1


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = run(tmp_path, "--name=full")
    real_save = train.save_checkpoint

    def save_then_die(run_dir, step, *a):
        out = real_save(run_dir, step, *a)
        if step == 2:
            raise KeyboardInterrupt  # killed right after the mid-run checkpoint
        return out
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--name=cut")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="already holds checkpoints"):  # nothing is overwritten by accident
        run(tmp_path, "--name=cut")
    cut = run(tmp_path, "--name=cut", "--resume=1", "--num_workers=2")  # batches made by 2 worker processes
    assert losses(cut) == losses(full)  # every step, exactly
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
    fast = run(tmp_path, "--name=b", "--bench=2", "--peak_tflops=1e-3")
    assert fast["peak_tflops"] == 1e-3 and fast["mfu"] > 1  # a 1 GFLOP/s "peak" is beaten
    assert "MFU against 0.001 TFLOP/s\n" in capsys.readouterr().out  # no "(measured matmul)" when given


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
