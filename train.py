"""Train nanoUMM: one loop for the CPU, one GPU and torchrun, driven by recipes.

    python train.py                                         # tiny preset on the CPU, end to end
    python train.py --recipe=uniedit --init_from=out/pretrain --name=uniedit
    python train.py --preset=small                          # one GPU (bf16, torch.compile)
    python train.py --preset=base --bench=50                # time 50 steps: one row of the speed table
    torchrun --standalone --nproc_per_node=4 train.py --preset=base
    python train.py -h                                      # every key with its default

Every key of TrainConfig below is a `--key=value` override; `--preset` picks model, world,
batch, schedule and data workers together and explicit keys win over it. A recipe is a data
mixture and loss weights (RECIPES); all recipes share this one loop.

Determinism: the sample at each position of the stream and the random draws of each
micro-batch (flow noise, t, condition dropout) are seeded by (seed, position), not by what
ran before, so a resumed run, and a run split over ranks, sees exactly the same numbers.
"""
import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch._dynamo.utils import counters as dynamo_counters
from tqdm import tqdm

import synth
from eval import evaluate, headline, on, to_markdown, to_uint8
from model import (TASK_GROUP, UMM, UMMConfig, checkpoints, collate, load_weights,
                   newest_checkpoint, read_meta, read_weights)


@dataclass
class TrainConfig:
    preset: str = "tiny"  # tiny (CPU) | small (one GPU) | base (a few GPUs)
    recipe: str = "pretrain"  # see RECIPES
    name: str = ""  # the run's folder is out_dir/name; default: the recipe's name
    out_dir: str = "out"
    init_from: str = ""  # checkpoint (or run folder: its newest) to start from; tuning recipes need one
    resume: bool = False  # continue from the newest complete checkpoint of this run
    seed: int = 0
    # data
    world: str = "tiny"
    data: str = ""  # a synth.py dataset folder; default: samples made on the fly
    mix: str = ""  # task weights "vqa:1,t2i:1,edit:1"; default: the recipe's
    num_workers: int = 0  # DataLoader worker processes making batches
    # optimisation
    batch_size: int = 32  # global, in samples
    micro_batch: int = 32  # per rank and forward pass; accumulation = batch_size / (micro_batch x ranks)
    max_steps: int = 6000  # the tiny base of the Uni-Edit experiment (README): 14 min on 2 cores
    lr: float = 3e-4  # 1e-3 and above left the tiny model blind: it answered from the question alone
    min_lr: float = 3e-5
    warmup: int = 100
    weight_decay: float = 0.05
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: no clipping
    ema: float = 0.995  # decay per step of the EMA weights that eval and sampling use
    # model (0 or -1 = the preset's or recipe's value)
    width: int = 0
    mot: bool = False
    refiner_layers: int = 0
    src_pixel_dropout: float = -1.0
    kernels: bool = False  # the fused Triton ops of kernels.py (on CUDA)
    flex: bool = True  # FlexAttention block masks on CUDA; 0: SDPA with a dense mask
    # speed
    compile: int = -1  # -1: on CUDA only
    bench: int = 0  # > 0: time this many steps after BENCH_WARMUP, print one row of the speed table, save nothing
    device: str = ""  # default: cuda if available, else cpu
    # logging, eval, checkpoints (a log line also closes at each checkpoint: see logs_at)
    log_every: int = 50  # 0: a line at checkpoints only
    eval_every: int = 1200  # 0: never
    save_every: int = 1200  # 0: the final checkpoint only
    keep: int = 2  # newest checkpoints kept; 0: all
    peak_tflops: float = 0.0  # what MFU divides by; 0: this device's measured dense matmul rate


def at_least(low, note=""):
    return lambda v: v >= low, f">= {low}{note}"


# What each numeric key of TrainConfig must be: a test of its value, and the same in words.
VALID = {
    "seed": at_least(0),
    "num_workers": at_least(0),
    "batch_size": at_least(1),
    "micro_batch": at_least(1),
    "max_steps": at_least(1),
    "lr": at_least(0),
    "min_lr": at_least(0),  # and at most lr, checked apart
    "warmup": at_least(0),
    "weight_decay": at_least(0),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": at_least(0, " (0: no clipping)"),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),  # 1 would freeze the EMA at the initial weights
    "width": (lambda v: v == 0 or v >= 32, "0 (the preset's) or >= 32"),  # depth = width // 32
    "refiner_layers": at_least(0),
    "src_pixel_dropout": (lambda v: v == -1 or 0 <= v <= 1, "-1 (the recipe's) or in [0, 1]"),
    "compile": (lambda v: v in (-1, 0, 1), "-1 (on CUDA only), 0 or 1"),
    "bench": at_least(0),
    "log_every": at_least(0, " (0: a line at checkpoints only)"),
    "eval_every": at_least(0, " (0: never)"),
    "save_every": at_least(0, " (0: the final checkpoint only)"),
    "keep": at_least(0, " (0: keep all)"),
    "peak_tflops": at_least(0, " (0: measured)"),
}


def check_config(cfg):
    """Refuse, in one pass before anything runs, a config that would crash later or train silently
    wrong: every numeric key against VALID, then the mix and the device. The one-line error names
    the key, its value and what it must be."""
    for f in dataclasses.fields(cfg):
        if f.type in (int, float):
            test, must = VALID[f.name]
            value = getattr(cfg, f.name)
            if not (math.isfinite(value) and test(value)):
                raise ValueError(f"--{f.name}={value} is out of range: it must be {must}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min_lr={cfg.min_lr} is out of range: it must be in [0, lr={cfg.lr}] "
                         f"(the cosine decays from lr to min_lr)")
    if cfg.mix:
        parse_mix(cfg.mix)
    check_device(cfg.device)


def check_device(name):
    """The device a run asks for exists on this machine ("": cuda if there is one, else cpu)."""
    if not name:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device={name}: train.py runs on cpu or cuda")
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= gpus:
        fix = "use --device=cpu" if gpus == 0 else f"use cuda:0 to cuda:{gpus - 1}"
        raise ValueError(f"--device={name}, but this machine has {gpus} CUDA GPU(s): {fix}")


BENCH_WARMUP = 10  # steps --bench runs before timing: compilation and autotuning happen in them
LOGGED = ("ce", "flow", "flow_t0", "flow_t1", "flow_t2", "flow_t3")  # flow_tk: flow loss with t in [k/4, (k+1)/4)

# The GPU presets make their data in 6 worker processes per rank: one core makes a 64-sample
# micro-batch of the default world in about 12 ms, three times the GPU time of a `small` one at 40%
# of 790 TFLOP/s (1.29 TFLOP: 4.1 ms). The tiny preset trains on the CPU, whose cores the workers
# would take from the model.
PRESETS = {  # what --preset sets; explicit --key=value overrides win
    "tiny": dict(world="tiny"),
    "small": dict(world="default", batch_size=256, micro_batch=64, max_steps=20_000, lr=4e-4, min_lr=4e-5,
                  warmup=500, ema=0.9995, eval_every=2000, save_every=2000, log_every=100, num_workers=6),
    "base": dict(world="default", batch_size=512, micro_batch=64, max_steps=40_000, lr=3e-4, min_lr=3e-5,
                 warmup=1000, ema=0.9999, eval_every=4000, save_every=2000, log_every=100, num_workers=6),
}

# A recipe is a few lines of data and weights. Stages split max_steps by their fractions.
RECIPES = {
    "pretrain": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=False),  # answers need the most steps
    "uniedit": dict(stages=[(1.0, "uniedit:1")], init=True, model=dict(ce_weight=0.0, src_pixel_dropout=1.0)),
    "simple_edit": dict(stages=[(1.0, "edit:1")], init=True),
    "mixed": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=True),
    "staged": dict(stages=[(0.3, "vqa:1"), (0.3, "t2i:1,edit:1"), (0.4, "vqa:1,t2i:1,edit:1")], init=False),
}


# ----------------------------------------------------------------------------- config

def parse_args(argv):
    """--key=value overrides typed from TrainConfig; --preset applies first, explicit keys win."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for f in fields.values():
            print(f"  --{f.name}={f.default!r}  ({f.type.__name__})")
        sys.exit(0)
    pairs = {}
    for a in argv:
        key, eq, value = a[2:].partition("=")
        if not a.startswith("--") or not eq:
            raise ValueError(f"argument {a!r} is not --key=value (see python train.py -h)")
        if key not in fields:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(fields)}")
        pairs[key] = value
    preset = pairs.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(**PRESETS[preset])
    for key, value in pairs.items():
        setattr(cfg, key, convert(key, value, fields[key].type))
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    return cfg


def convert(key, value, typ):
    try:
        if typ is bool:
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return value.lower() in ("1", "true")
        return typ(value)
    except ValueError:
        raise ValueError(f"--{key}={value!r} is not a valid {typ.__name__}") from None


def parse_mix(mix):
    out = {}
    for part in mix.split(","):
        task, _, w = part.partition(":")
        if task not in synth.TASKS:
            raise ValueError(f"mix names unknown task {task!r}: choose from {', '.join(synth.TASKS)}")
        try:
            out[task] = float(w or 1)
        except ValueError:
            out[task] = math.nan  # refused just below, with the other bad weights
        if not (math.isfinite(out[task]) and out[task] > 0):
            raise ValueError(f"--mix={mix}: the weight of {task} is {w!r}; it must be a number > 0")
    return out


def task_counts(mix, n):
    """A fixed number of samples per task in every micro-batch (largest remainder), so shapes never change."""
    weights = parse_mix(mix)
    total = sum(weights.values())
    raw = {t: n * w / total for t, w in weights.items()}
    counts = {t: int(r) for t, r in raw.items()}
    for t in sorted(raw, key=lambda t: counts[t] - raw[t])[:n - sum(counts.values())]:
        counts[t] += 1
    return {t: c for t, c in counts.items() if c}


def model_config(cfg, vocab_size):
    """The preset's model, then the recipe's loss weights and dropouts, then explicit keys."""
    mc = UMMConfig.preset(cfg.preset, vocab_size=vocab_size, image_size=synth.get_world(cfg.world).size,
                          **RECIPES[cfg.recipe].get("model", {}))
    overrides = dict(mot=cfg.mot, refiner_layers=cfg.refiner_layers, kernels=cfg.kernels, flex=cfg.flex)
    if cfg.width:
        overrides.update(width=cfg.width, depth=0, heads=0)
    if cfg.src_pixel_dropout >= 0:
        overrides["src_pixel_dropout"] = cfg.src_pixel_dropout
    return dataclasses.replace(mc, **overrides)


# ----------------------------------------------------------------------------- data

class Stream(torch.utils.data.Dataset):
    """Micro-batch `c` of the run: a fixed number of samples per task, each a pure function of
    (seed, position); from a dataset folder, position p of task t is its train record perm[p]."""

    def __init__(self, cfg, mix, tok, mcfg):
        self.cfg, self.counts, self.tok, self.mcfg = cfg, task_counts(mix, cfg.micro_batch), tok, mcfg
        self.world = synth.get_world(cfg.world)
        self.ds = synth.Dataset(cfg.data) if cfg.data else None
        if self.ds is not None:
            if self.ds.world.size != self.world.size:
                raise ValueError(f"dataset {cfg.data} has {self.ds.world.size}px images, --world={cfg.world} "
                                 f"needs {self.world.size}px: pass the dataset's world")
            recs = self.ds.records()
            rng = np.random.default_rng(cfg.seed)
            self.pools = {t: rng.permutation([i for i, r in enumerate(recs) if r["split"] == "train" and r["task"] == t])
                          for t in self.counts}
            for t, pool in self.pools.items():
                if not len(pool):
                    raise ValueError(f"dataset {cfg.data} has no train samples of task {t!r} that the mix needs")

    def __len__(self):
        return 1 << 40

    def __getitem__(self, c):
        samples = []
        for t, n in self.counts.items():
            for j in range(n):
                p = c * self.cfg.micro_batch + j  # unique position of this sample in the run
                if self.ds is None:
                    samples.append(synth.make_sample(self.world, t, "train", p, self.cfg.seed))
                else:
                    samples.append(self.ds[int(self.pools[t][p % len(self.pools[t])])])
        return collate(samples, self.mcfg, self.tok)


def loader(stream, first, stride, num_workers, device):
    """Micro-batches first, first + stride, first + 2 stride, ... made by background workers; on CUDA in
    pinned memory, so that copying one to the GPU does not make the host wait for the copy."""
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, sampler=range(first, 1 << 40, stride),
                                            num_workers=num_workers, pin_memory=device.type == "cuda"))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, step, model, ema, opt, meta, tok, keep):
    """Write step_NNNNNN under a temporary name and rename it when complete: a crash mid-save
    leaves the previous checkpoints untouched and no half-written folder that looks complete."""
    final = os.path.join(run_dir, f"step_{step:06d}")
    tmp = os.path.join(run_dir, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    if os.environ.get("NANOUMM_TEST_KILL_IN_SAVE") == str(step):  # test_train.py's crash test:
        os.kill(os.getpid(), signal.SIGKILL)  # it dies with this checkpoint half written
    save_file({k: v.cpu().contiguous() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:  # written last: its presence marks a complete folder
        json.dump({**meta, "step": step}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep:  # 0 keeps every checkpoint
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def saves_at(cfg, done):
    """Is a checkpoint written after `done` steps? Every save_every (0: never), and at the end."""
    return done == cfg.max_steps or (cfg.save_every > 0 and done % cfg.save_every == 0)


def logs_at(cfg, done):
    """Is a line logged after `done` steps? Every log_every steps (0: never) and at each checkpoint:
    no line averages over a checkpoint, so a run resumed from one logs the lines of the run that
    never stopped."""
    return saves_at(cfg, done) or (cfg.log_every > 0 and done % cfg.log_every == 0)


# The keys that decide the samples and noise of each step: a resumed run must match its checkpoint
# in each (max_steps places the stages of a recipe), as well as in the whole model config.
RESUME_KEYS = ("recipe", "seed", "world", "data", "mix", "batch_size", "micro_batch", "max_steps")


def check_resume(meta, cfg, mcfg, ckpt):
    """Refuse to resume from checkpoint `ckpt` (whose config.json is `meta`) with another stream or
    model: the run would no longer be the one that stopped."""
    if meta["model"] != asdict(mcfg):
        diff = [k for k in meta["model"] if meta["model"][k] != asdict(mcfg).get(k)]
        raise ValueError(f"checkpoint {ckpt}/config.json has a different model config "
                         f"({', '.join(diff)}) than this run")
    for key in RESUME_KEYS:
        if meta["train"][key] != getattr(cfg, key):
            raise ValueError(f"checkpoint {ckpt}/config.json has {key}={meta['train'][key]!r}, "
                             f"this run {key}={getattr(cfg, key)!r}: resume with the same value")


# ----------------------------------------------------------------------------- the run folder
# out_dir/name holds the checkpoints, log.jsonl (losses, lr, grad norm, eval scores: what a resumed
# run reproduces), speed.jsonl (timings: what no rerun reproduces) and, while a run writes, LOCK.

LOCK = "lock"  # "pid host" of the process that holds the folder


def claim_run_dir(run_dir, resume):
    """Hold run_dir for this run, and check that it suits the run. A new run needs a folder
    without checkpoints or log (nothing is overwritten); --resume needs a checkpoint, or at least
    the log of a run that died before its first one (it starts over). The leftovers of a
    checkpoint write cut short go."""
    has_ckpt = newest_checkpoint(run_dir) is not None
    has_log = os.path.exists(os.path.join(run_dir, "log.jsonl"))
    if resume and not has_ckpt and not has_log:  # refused before anything is made
        raise ValueError(f"--resume: no complete checkpoint in {run_dir}; drop --resume to start "
                         f"fresh")
    try:
        os.makedirs(run_dir, exist_ok=True)
        hold(run_dir)  # first: a run still writing into the folder is named as such
    except OSError as e:
        raise ValueError(f"cannot write the run folder {run_dir} ({e.strerror}): pass a writable "
                         f"--out_dir or another --name") from None
    if not resume and (has_ckpt or has_log):
        release(run_dir)
        what = "checkpoints" if has_ckpt else "the log of a run that died before its first one"
        raise ValueError(f"{run_dir} already holds {what}: pass --resume to continue it or "
                         f"--name=NAME for a new run (nothing is overwritten)")
    for tmp in glob.glob(os.path.join(run_dir, ".tmp_step_*")):
        shutil.rmtree(tmp)


def hold(run_dir):
    """Create run_dir/LOCK with this process's id; refuse while another live process holds it, and
    take over the lock of one that is gone (killed, crashed, or an earlier run in this process that
    raised). Checked at start only: two runs started at once over a dead lock could both pass."""
    path = os.path.join(run_dir, LOCK)
    while True:
        try:
            with open(path, "x") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            return
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = f.read().split()
            except FileNotFoundError:  # given up since: try again
                continue
            if alive(holder):
                who = f"process {' on '.join(holder)}" if len(holder) == 2 else "an unknown process"
                raise ValueError(f"{run_dir} is held by {who} (its lock file {path}): wait for "
                                 f"that run to end, or delete the file if no run uses the folder"
                                 ) from None
            os.remove(path)


def alive(holder):
    """Is the process of a lock's ["pid", "host"] running? On another host, unknown: yes."""
    if len(holder) != 2 or not holder[0].isdigit() or holder[1] != socket.gethostname():
        return True
    pid = int(holder[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def release(run_dir):
    os.remove(os.path.join(run_dir, LOCK))


def cut_log(path, step):
    """Keep the lines of a .jsonl log up to `step`, where a resumed run continues (it logs the later
    steps again). The file is replaced whole (temp + rename), so a crash here loses nothing; a last
    line without its newline is a write cut short by a crash, and goes."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines, 1):
        if i == len(lines) and not line.endswith("\n"):
            break
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} line {i} is not a log record with a step: repair or delete "
                             f"the line") from None
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def open_logs(run_dir, step):
    """log.jsonl and speed.jsonl for appending, each first cut back to `step`."""
    files = []
    for name in ("log.jsonl", "speed.jsonl"):
        cut_log(os.path.join(run_dir, name), step)
        files.append(open(os.path.join(run_dir, name), "a"))
    return files


# ----------------------------------------------------------------------------- training

def lr_at(cfg, step):
    """Linear warmup, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    q = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * q))


def stage_at(cfg, step):
    """(stage index, mix) of a step: each stage of the recipe takes its fraction of max_steps."""
    stages, edge = RECIPES[cfg.recipe]["stages"], 0.0
    for i, (frac, mix) in enumerate(stages):
        edge += frac * cfg.max_steps
        if step < round(edge) or i == len(stages) - 1:
            return i, (cfg.mix or mix)


def peak_flops(cfg, device):
    """The FLOP/s that MFU divides by: --peak_tflops if given, else measured on this device."""
    return cfg.peak_tflops * 1e12 if cfg.peak_tflops else measured_matmul_flops(device)


def device_name(device):
    """The name a timing is reported under: the GPU's model, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timings(fn, device, repeats):
    """Wall times of `repeats` calls of fn() after one warm-up call (which builds kernels, and lets
    the BLAS library pick its own); on CUDA each call is timed to the end of its GPU work."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def median_seconds(fn, device, repeats=5):
    return statistics.median(timings(fn, device, repeats))


@functools.cache
def measured_matmul_flops(device):
    """Best rate of 10 timings of a large square matmul in the training dtype (bf16 on CUDA, fp32
    on CPU).

    Measured rather than read off a data sheet: it is what this device, at its clocks and power
    limit, reaches on the best case of the op the model spends its time in. The data-sheet dense
    bf16 peak of an H100/H200 SXM is 989 TFLOP/s; MFU against it is lower by the ratio printed.
    The best rather than the median: other work on the device only ever slows a timing down."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 1)
    a = torch.ones(n, n, device=device, dtype=dtype)  # ones, not randn: the RNG stream stays untouched

    def matmuls():
        for _ in range(reps):
            a @ a

    return 2 * n ** 3 * reps / min(timings(matmuls, device, repeats=10))


def setup_distributed(cfg):
    """(rank, world_size, device); torchrun sets RANK/WORLD_SIZE, plain python runs one process."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rates(model, counts, cfg, dt, peak):
    """Throughput of steps of dt seconds whose micro-batches hold counts samples per task."""
    per_s = lambda per_sample: sum(n * per_sample(t) for t, n in counts.items()) / cfg.micro_batch * cfg.batch_size / dt
    flops = per_s(model.flops_per_sample)
    return {"ms_per_step": dt * 1e3, "tokens_per_s": per_s(lambda t: model.layouts[TASK_GROUP[t]].T),
            "images_per_s": per_s(lambda t: t != "vqa"), "mfu": flops / peak}


def checked_rates(model, counts, cfg, dt, peak, device):
    """rates(), and the peak they divide by: a measured peak that the run beats (MFU above 1) was
    timed while other work slowed the device, so it is measured again and the higher one kept."""
    r = rates(model, counts, cfg, dt, peak)
    if r["mfu"] > 1 and not cfg.peak_tflops:
        measured_matmul_flops.cache_clear()
        peak = max(peak, measured_matmul_flops(device))
        r = rates(model, counts, cfg, dt, peak)
    return r, peak


def mfu_text(mfu, cfg):
    """MFU as printed: one above 100% says that the peak it divides by is wrong, and why."""
    if mfu <= 1:
        return f"{100 * mfu:.1f}%"
    why = "--peak_tflops is below this device's" if cfg.peak_tflops else "measured twice, low twice"
    return f"{100 * mfu:.1f}% (over 100%: the peak it divides by is wrong; {why})"


def bench_row(cfg, model, counts, dt, peak, device, graphs, compiled):
    """Print and return the --bench result: one row of README's speed table."""
    r, peak = checked_rates(model, counts, cfg, dt, peak, device)
    r = {**r, "peak_tflops": peak / 1e12, "recompiles": graphs,
         "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    setup = "compile" if compiled else "eager"
    setup += " + kernels" * cfg.kernels + (" + flex" if cfg.flex and device.type == "cuda" else " + sdpa")
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
    print("| preset | setup | device | tokens/s | images/s | ms/step | MFU | of peak TFLOP/s "
          "| peak mem GiB | recompiles after warm-up |")
    print(f"| {cfg.preset} | {setup} | {device_name(device)} | "
          f"{r['tokens_per_s']:,.0f} | {r['images_per_s']:,.1f} | {r['ms_per_step']:.1f} | "
          f"{mfu_text(r['mfu'], cfg)} | "
          f"{r['peak_tflops']:.4g} | {mem} | {graphs} |")
    return r


def train(cfg):
    check_config(cfg)
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    if cfg.bench:  # a timing run: warm-up steps, then the timed ones; no log, checkpoint or eval
        cfg = dataclasses.replace(cfg, max_steps=BENCH_WARMUP + cfg.bench, eval_every=0, resume=False)
    if cfg.batch_size % (cfg.micro_batch * world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch={cfg.micro_batch} "
                         f"x {world_size} ranks")
    accum = cfg.batch_size // (cfg.micro_batch * world_size)
    run_dir = os.path.join(cfg.out_dir, cfg.name or cfg.recipe)
    tok = synth.get_tokenizer(cfg.world)
    mcfg = model_config(cfg, tok.get_vocab_size())
    torch.manual_seed(cfg.seed)
    model = UMM(mcfg).to(device)

    # where to start: resume this run, or initialise from another checkpoint, or from scratch
    start, resume_from = 0, newest_checkpoint(run_dir) if cfg.resume else None
    if master and not cfg.bench:
        claim_run_dir(run_dir, cfg.resume)
    if RECIPES[cfg.recipe]["init"] and not cfg.init_from and not resume_from:
        raise ValueError(f"recipe {cfg.recipe!r} tunes a pretrained model: pass --init_from=CHECKPOINT")
    if resume_from:
        meta = read_meta(resume_from)
        check_resume(meta, cfg, mcfg, resume_from)
        start = meta["step"]
        if start >= cfg.max_steps:
            if master:
                print(f"run {run_dir} has finished: its checkpoint {resume_from} is of the last "
                      f"step (--max_steps={cfg.max_steps}); nothing to resume")
                release(run_dir)
            return run_dir
        load_weights(resume_from, "model.safetensors", model)
    elif cfg.init_from:
        src = newest_checkpoint(cfg.init_from)
        if src is None:
            raise ValueError(f"--init_from={cfg.init_from}: no checkpoint there (a step_* folder or a run folder)")
        load_weights(src, "ema.safetensors", model)  # tune from the EMA weights, as released models are
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if resume_from:
        ema = read_weights(resume_from, "ema.safetensors", model)  # checked as the weights are
        ema = {k: v.to(device) for k, v in ema.items()}

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and embeddings of 1-D don't
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")
    if resume_from:
        try:
            opt.load_state_dict(torch.load(os.path.join(resume_from, "optim.pt"), map_location=device))
        except Exception as e:
            raise ValueError(f"checkpoint file {resume_from}/optim.pt is missing or corrupt: {e}") from None

    use_compile = cfg.compile == 1 or (cfg.compile == -1 and device.type == "cuda")
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world_size > 1 else None
    step_model = ddp or model
    loss_fn = torch.compile(step_model) if use_compile else step_model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    peak = peak_flops(cfg, device)

    meta = {"model": asdict(mcfg), "train": asdict(cfg), "world": asdict(synth.get_world(cfg.world)),
            "versions": {"torch": torch.__version__, "python": platform.python_version(), "synth": synth.VERSION}}
    if master:
        n = model.num_params()
        print(f"run {run_dir}: recipe {cfg.recipe}, preset {cfg.preset}, {n['total'] / 1e6:.2f} M params, "
              f"{world_size} rank(s) on {device}, accumulation {accum}, compile {use_compile}, from step {start}, "
              f"MFU against {peak / 1e12:.4g} TFLOP/s" + (" (measured matmul)" if not cfg.peak_tflops else ""))
    log, speed = open_logs(run_dir, start) if master and not cfg.bench else (None, None)
    stage, data = None, None
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not master, dynamic_ncols=True, desc=cfg.recipe)
    t_last, sums, count = time.perf_counter(), torch.zeros(2, len(LOGGED), device=device), 0  # (sum, n) per logged loss
    nan = torch.full((), math.nan, device=device)  # the value of a loss a micro-batch does not have
    for step in range(start, cfg.max_steps):
        if cfg.bench and step == BENCH_WARMUP:  # start the clock and the counts once warm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t_bench, graphs = time.perf_counter(), dynamo_counters["stats"]["unique_graphs"]
        s, mix = stage_at(cfg, step)
        if s != stage:  # a new stage (or the start) sets up the stream at this step's first micro-batch
            stage = s
            stream = Stream(cfg, mix, tok, mcfg)
            data = loader(stream, step * accum * world_size + rank, world_size, cfg.num_workers, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        model.train()
        # Losses stay on the device until the end of the step: reading one (.item()) makes the host wait
        # for the GPU, which then idles while the host queues the next micro-batch's kernels.
        step_loss = torch.zeros((), device=device)
        for a in range(accum):
            chunk = step * accum * world_size + a * world_size + rank
            batch = {task: {k: v.to(device, non_blocking=True) for k, v in sub.items()} for task, sub in next(data).items()}
            torch.manual_seed(synth.sample_seed("noise", cfg.seed, chunk))  # this micro-batch's noise, t, dropout
            noise = model.draw_noise(batch)  # eagerly, outside the compiled loss: the same draws compiled or not
            sync = ddp.no_sync() if ddp is not None and a < accum - 1 else contextlib.nullcontext()
            with sync, amp:
                loss, parts = loss_fn(batch, noise)
            with sync:
                (loss / accum).backward()
            step_loss += loss.detach() / accum
            # The logged losses as one vector, NaN where this micro-batch has none (no such task, or a t-bin
            # no sample fell in), so the log costs a few GPU kernels per micro-batch rather than one per loss.
            v = torch.stack([parts[k].float() if k in parts else nan for k in LOGGED])
            seen = ~v.isnan()
            sums[0] += torch.where(seen, v, 0.0)
            sums[1] += seen
        if world_size > 1:  # every rank sees the global loss, so all of them stop together on a NaN
            dist.all_reduce(step_loss)
            step_loss /= world_size
        # grad_clip 0 clips at infinity: the norm is still computed (and logged), the gradients kept
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        step_loss, gnorm = torch.stack([step_loss.float(), gnorm.float()]).tolist()  # the step's one wait
        if not math.isfinite(step_loss):  # stop before the update: nothing broken reaches a checkpoint
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; the run stopped before updating "
                                     f"the weights and saved nothing from it: lower --lr or check the data")
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # all tensors in one call: on a GPU a few kernels instead of one per tensor
            live = model.state_dict()  # paired by name: a resumed ema comes in the checkpoint file's order
            torch._foreach_lerp_([ema[k] for k in live], [v.float() for v in live.values()], 1 - cfg.ema)
        count += 1
        done = step + 1
        if not cfg.bench and logs_at(cfg, done):
            if world_size > 1:
                dist.all_reduce(sums)
            means = {k: (sums[0, i] / sums[1, i]).item() for i, k in enumerate(LOGGED) if sums[1, i] > 0}
            dt = (time.perf_counter() - t_last) / count
            rec = {"step": done, **means, "lr": lr_at(cfg, step), "grad_norm": gnorm,
                   "stage": stage}
            r, peak = checked_rates(model, stream.counts, cfg, dt, peak, device)
            sums, count, t_last = torch.zeros_like(sums), 0, time.perf_counter()
            if master:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                speed.write(json.dumps({"step": done, **r, "peak_tflops": peak / 1e12}) + "\n")
                speed.flush()
                eta = dt * (cfg.max_steps - done)
                show = lambda k: f"{rec[k]:.4f}" if k in rec else "-"
                bar.write(f"step {done:6d} | ce {show('ce')} | flow {show('flow')} | "
                          f"lr {rec['lr']:.2e} | gnorm {gnorm:.2f} | {dt * 1e3:.0f} ms | "
                          f"{r['tokens_per_s']:,.0f} tok/s | {r['images_per_s']:,.1f} img/s | "
                          f"mfu {mfu_text(r['mfu'], cfg)} | eta {eta / 60:.1f} min")
        bar.update(1)
        # eval before the checkpoint: a run stopped between the two redoes both, eval line included
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            evaluate_run(cfg, model, ema, tok, mcfg, run_dir, done, device, rank, world_size)
        if not cfg.bench and saves_at(cfg, done):
            if master:
                save_checkpoint(run_dir, done, model, ema, opt, meta, tok, cfg.keep)
            if world_size > 1:
                dist.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
    bar.close()
    if log:
        log.close()
        speed.close()
        release(run_dir)
    row = None
    if cfg.bench:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t_bench) / cfg.bench
        graphs = dynamo_counters["stats"]["unique_graphs"] - graphs
        row = bench_row(cfg, model, stream.counts, dt, peak, device, graphs, use_compile) if master else None
    if world_size > 1:
        dist.destroy_process_group()
    return row if cfg.bench else run_dir


# ----------------------------------------------------------------------------- eval during training

@torch.no_grad()
def evaluate_run(cfg, model, ema, tok, mcfg, run_dir, step, device, rank, world_size):
    """With the EMA weights: eval.evaluate on small val sets (each rank scores its share, the records are
    gathered) and, on rank 0, its table, the headline numbers in log.jsonl and a grid of generations and
    edits under run_dir/samples/."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(live[k].dtype) for k, v in ema.items()})
    model.eval()
    world = synth.get_world(cfg.world)
    # small counts keep an eval of the tiny preset to seconds; python eval.py scores a checkpoint fully
    results = evaluate(model, tok, world, "val", n=128, n_t2i=28, samples_per_prompt=2, n_edit=32, device=device,
                       rank=rank, world_size=world_size, progress=False)
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        rows = []
        g = torch.Generator().manual_seed(cfg.seed)
        for task in ("t2i", "edit", "uniedit"):
            ss = [synth.make_sample(world, task, "val", i) for i in range(8)]
            sub = on(device, collate(ss, mcfg, tok)[TASK_GROUP[task]])
            made = to_uint8(model.sample(TASK_GROUP[task], sub, steps=20, generator=g))  # (8, S, S, 3)
            blank = np.zeros_like(made[0])
            rows += [[s["image"] if s["image"] is not None else blank for s in ss], list(made), [s["target"] for s in ss]]
        grid = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
        from PIL import Image
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
            os.path.join(run_dir, "samples", f"step_{step:06d}.png"))
        with open(os.path.join(run_dir, "samples", f"step_{step:06d}.md"), "w") as f:
            f.write(to_markdown(results, f"step {step}, EMA weights"))
        scores = headline(results)
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in scores.items()}}) + "\n")
        tqdm.write(f"eval step {step} (EMA): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                   + f"; table and grid in {run_dir}/samples/step_{step:06d}.md/.png")
    model.load_state_dict(live)


if __name__ == "__main__":
    try:
        train(parse_args(sys.argv[1:]))
    except (ValueError, FloatingPointError) as e:  # bad input, or a diverged run: one line
        sys.exit(f"error: {e}")
