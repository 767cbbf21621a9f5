"""Train nanoUMM: one loop for the CPU, one GPU and torchrun, driven by recipes.

    python train.py                                  # tiny preset on the CPU, end to end
    python train.py --recipe=uniedit --init_from=out/pretrain --name=uniedit
    python train.py --preset=small                   # one GPU (bf16, torch.compile)
    python train.py --preset=base --bench=50         # time 50 steps: one row of the speed table
    torchrun --standalone --nproc_per_node=4 train.py --preset=base
    python train.py -h                               # every key with its default and comment

Every key of TrainConfig below is an override, `--key=value` or `--key value`; `--preset` picks
model, world, batch, schedule and data workers together and explicit keys win over it. A recipe
is a data mixture and loss weights (RECIPES); all recipes share this one loop.

Reading order: the config, the data stream, the run's setup (devices; resume or init), the
checkpoint, eval and log helpers, then train() with the step loop, and at the end --bench, which
times steps of that same loop.

Determinism: the sample at each position of the stream and the random draws of each
micro-batch (flow noise, t, condition dropout) are seeded by (seed, position), not by what
ran before, so a resumed run, and a run split over ranks, sees exactly the same numbers.
"""
import contextlib
import dataclasses
import glob
import inspect
import json
import math
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch._dynamo.utils import counters as dynamo_counters
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import kernels
import synth
from eval import evaluate, headline, num, save_atomic, to_markdown
from model import (TASK_GROUP, UMM, UMMConfig, checkpoints, collate, load_weights,
                   newest_checkpoint, read_meta, read_weights)


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    preset: str = "tiny"  # tiny (CPU) | small (one GPU) | base (a few GPUs)
    recipe: str = "pretrain"  # see RECIPES
    name: str = ""  # the run's folder is out_dir/name; default: the recipe's name
    out_dir: str = "out"  # where run folders go
    init_from: str = ""  # checkpoint (or run folder: its newest) to start from; tunings need one
    resume: bool = False  # continue from the newest complete checkpoint of this run
    seed: int = 0  # the data order, the initial weights and the flow noise
    # data
    world: str = "tiny"  # the synth world: tiny or default (both 64 px; see synth.WORLDS)
    data: str = ""  # a synth.py dataset folder; default: samples made on the fly
    mix: str = ""  # task weights "vqa:1,t2i:1,edit:1"; default: the recipe's
    num_workers: int = 0  # DataLoader worker processes making batches
    # optimisation
    batch_size: int = 32  # global, in samples
    micro_batch: int = 32  # per rank and pass; accumulation = batch_size / (micro_batch x ranks)
    max_steps: int = 3600  # the quickstart: 8-13 min on 2 CPU cores (README); the base trains 16,000
    lr: float = 6e-4  # 3e-4 before: 6e-4 lifted the 16,000-step base on all but intelligent edits
    gen_lr_scale: float = 1.0  # the generation side's lr (GENERATION_SIDE) as a multiple of lr
    min_lr: float = 3e-5  # the cosine schedule's end, at max_steps
    warmup: int = 100  # steps of linear warm-up
    weight_decay: float = 0.05  # AdamW's, on matrices only
    beta2: float = 0.99  # AdamW's (beta1 0.9)
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    ema: float = 0.995  # decay per step of the EMA weights that eval and sampling use
    # model (0 or -1: the preset's or recipe's value)
    width: int = 0  # the model's size dial; depth and heads follow it
    mot: bool = False  # BAGEL's mixture-of-transformers (model.py)
    refiner_layers: int = 0  # Ovis-U1's refiner blocks (model.py)
    src_pixel_dropout: float = -1.0  # how often training drops an edit's clean pixel source
    model: str = ""  # any other UMMConfig keys, "key=value,key=value" (ablations), e.g. "depth=6"
    kernels: bool = False  # the fused Triton ops of kernels.py (on CUDA)
    flex: bool = True  # FlexAttention block masks on CUDA; 0: SDPA with a dense mask
    # speed
    compile: int = -1  # -1: on CUDA only
    bench: int = 0  # > 0: time this many steps after a warm-up, print a speed row, save nothing
    device: str = ""  # default: cuda if available, else cpu
    # logging, eval, checkpoints (a log line also closes at each checkpoint: see logs_at)
    log_every: int = 50  # steps per line of log.jsonl and the terminal; 0: at checkpoints only
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
    "gen_lr_scale": at_least(0),
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
    parse_model_keys(cfg.model)
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


# The GPU presets make their data in 6 worker processes per rank: one core makes a micro-batch of
# the default world more slowly than a GPU trains on it (README, Speed). The tiny preset trains
# on the CPU, whose cores the workers would take from the model.
PRESETS = {  # what --preset sets; explicit --key=value overrides win
    "tiny": dict(world="tiny"),
    "small": dict(world="default", batch_size=256, micro_batch=64, max_steps=20_000, lr=4e-4,
                  min_lr=4e-5, warmup=500, ema=0.9995, eval_every=2000, save_every=2000,
                  log_every=100, num_workers=6),
    "base": dict(world="default", batch_size=512, micro_batch=64, max_steps=40_000, lr=3e-4,
                 min_lr=3e-5, warmup=1000, ema=0.9999, eval_every=4000, save_every=2000,
                 log_every=100, num_workers=6),
}

# A recipe is a few lines of data and weights. Stages split max_steps by their fractions; a
# stage's optional third item names the parameters it trains (prefixes), the rest held still.
UNDERSTANDING_ENCODER = ("enc_in", "enc_pos", "encoder.", "enc_norm", "adapter", "sem_pos",
                         "code_emb", "sem_cells")  # the ViT, adapter, code embeddings, probe head
# The weights only the flow path uses: its input and source projections, time embedding,
# per-cell and layout heads, refiner and flow head, and under MoT each block's `gen` expert.
# --gen_lr_scale sets their learning rate apart from the trunk's and the understanding side's.
GENERATION_SIDE = ("pix_in", "pix_pos", "noisy_pos", "src_pix", "src_sem", "t_mlp", "gen_cells",
                   "layout", "refiner.", "cls", "head", "to_pixels")


def generation_side(name):
    return name.startswith(GENERATION_SIDE) or ".gen." in name


RECIPES = {
    # answers need most steps; their CE pulls on the trunk 8-11x harder than the flow path's losses
    # (README, "How hard each task pulls"), so it weighs 0.1, or AdamW barely moves the trunk
    # for T2I and edits
    "pretrain": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=False, model=dict(ce_weight=0.1)),
    "uniedit": dict(stages=[(1.0, "uniedit:1")], init=True,  # the flow loss alone
                    model=dict(ce_weight=0.0, src_pixel_dropout=1.0, sem_cell_weight=0.0,
                               gen_cell_weight=0.0)),
    "simple_edit": dict(stages=[(1.0, "edit:1")], init=True),
    "mixed": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=True),
    "staged": dict(stages=[(0.3, "vqa:1"), (0.3, "t2i:1,edit:1"), (0.4, "vqa:1,t2i:1,edit:1")],
                   init=False),
    # UniToken's three stages (README, "UniToken's unified visual encoding"): (I) align the
    # encoder, adapter and code embeddings on understanding with the trunk still, (II) joint
    # understanding and generation, (III) instruction tuning, here intelligent edits + VQA
    "unitoken": dict(stages=[(0.1, "vqa:1", UNDERSTANDING_ENCODER), (0.7, "vqa:2,t2i:1,edit:1"),
                             (0.2, "vqa:1,uniedit:1")],
                     init=False, model=dict(dual_tokens=True)),
}


def parse_args(argv):
    """TrainConfig from `--key=value` or `--key value` overrides, typed by TrainConfig's fields;
    --preset applies first, explicit keys win."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        sys.exit(0)
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    pairs = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            raise ValueError(f"argument {arg!r} is not --key=value or --key value "
                             f"(see python train.py -h)")
        if key not in fields:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(fields)}")
        if not eq:
            if not args:
                raise ValueError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            value = args.pop(0)
        pairs[key] = value
    preset = pairs.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(**PRESETS[preset])
    for key, value in pairs.items():
        setattr(cfg, key, convert(key, value, fields[key]))
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


def help_text():
    """python train.py -h: this docstring, then TrainConfig's body as a list of keys, each with
    its default and the comment beside it (read from the source, so the two never differ)."""
    lines = [__doc__, "Keys (TrainConfig; a --preset changes some defaults, see PRESETS):"]
    defaults = asdict(TrainConfig())
    for line in inspect.getsource(TrainConfig).splitlines():
        code, _, comment = line.strip().partition("#")
        key = code.split(":")[0]
        if key in defaults:
            lines.append((f"  --{key}={defaults[key]!r}".ljust(30) + comment.strip()).rstrip())
        elif not code and comment:  # a section comment
            lines.append(comment.strip())
    return "\n".join(lines)


def model_config(cfg, vocab_size):
    """The preset's model, then the recipe's loss weights and dropouts, then explicit keys."""
    world = synth.get_world(cfg.world)
    mc = UMMConfig.preset(cfg.preset, vocab_size=vocab_size, image_size=world.size,
                          cells=world.grid, **RECIPES[cfg.recipe].get("model", {}))
    overrides = dict(mot=cfg.mot, refiner_layers=cfg.refiner_layers, kernels=cfg.kernels,
                     flex=cfg.flex)
    if cfg.width:
        overrides.update(width=cfg.width, depth=0, heads=0)
    if cfg.src_pixel_dropout >= 0:
        overrides["src_pixel_dropout"] = cfg.src_pixel_dropout
    return dataclasses.replace(mc, **{**overrides, **parse_model_keys(cfg.model)})  # --model wins


def parse_model_keys(text):
    """--model="key=value,..." -> {UMMConfig key: typed value}; unknown keys and values refused."""
    fields = {f.name: f.type for f in dataclasses.fields(UMMConfig)}
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in fields:
            raise ValueError(f"--model names unknown UMMConfig key {key!r}; valid keys: "
                             f"{', '.join(fields)}")
        out[key] = convert(key, value, fields[key])
    return out


# ----------------------------------------------------------------------------- data

def parse_mix(mix):
    out = {}
    for part in mix.split(","):
        task, _, w = part.partition(":")
        if task not in synth.MIX_TASKS:
            raise ValueError(f"mix names unknown task {task!r}: choose from "
                             f"{', '.join(synth.MIX_TASKS)}")
        try:
            out[task] = float(w or 1)
        except ValueError:
            out[task] = math.nan  # refused just below, with the other bad weights
        if not (math.isfinite(out[task]) and out[task] > 0):
            raise ValueError(f"--mix={mix}: the weight of {task} is {w!r}; it must be a number > 0")
    return out


def task_counts(mix, n):
    """A fixed number of samples per task in every micro-batch (largest remainder), so shapes
    never change."""
    weights = parse_mix(mix)
    total = sum(weights.values())
    raw = {t: n * w / total for t, w in weights.items()}
    counts = {t: int(r) for t, r in raw.items()}
    for t in sorted(raw, key=lambda t: counts[t] - raw[t])[:n - sum(counts.values())]:
        counts[t] += 1
    return {t: c for t, c in counts.items() if c}


def plan_micro_batch(batch_size, micro_batch, ranks, mixes):
    """(micro, accumulation): the largest micro-batch <= micro_batch with batch_size = micro x
    ranks x accumulation in which every task of every mix keeps a sample (task_counts drops a
    task that rounds to zero, which would silently change the recipe). The stream is a function
    of the seed and the micro-batch: the same micro-batch gives the same samples on any ranks."""
    def holds_mix(micro):
        return all(len(task_counts(mix, micro)) == sum(w > 0 for w in parse_mix(mix).values())
                   for mix in mixes)

    micros = [m for m in range(micro_batch, 0, -1) if holds_mix(m)]  # largest first
    if not micros:
        raise ValueError(f"micro_batch={micro_batch} is too small to hold one sample of every "
                         f"task of {' / '.join(mixes)}: raise --micro_batch")
    for micro in micros:
        if batch_size % (micro * ranks) == 0:
            return micro, batch_size // (micro * ranks)
    valid = [b for b in range(1, batch_size + micro_batch * ranks + 1)
             if b != batch_size and any(b % (m * ranks) == 0 for m in micros)]
    below = [b for b in valid if b < batch_size][-1:]
    above = [b for b in valid if b > batch_size][:1]
    raise ValueError(f"batch_size={batch_size} cannot be split into micro-batches of at most "
                     f"{micro_batch} samples over {ranks} ranks: use "
                     + " or ".join(f"--batch_size={b}" for b in below + above))


class Stream(torch.utils.data.Dataset):
    """Micro-batch `c` of the run: a fixed number of samples per task, each a pure function of
    (seed, position); from a dataset folder, position p of task t is its train record perm[p]."""

    def __init__(self, cfg, mix, tok, mcfg):
        self.cfg = cfg
        self.counts = task_counts(mix, cfg.micro_batch)
        self.tok = tok
        self.mcfg = mcfg
        self.world = synth.get_world(cfg.world)
        self.ds = synth.Dataset(cfg.data) if cfg.data else None
        if self.ds is not None:
            if self.ds.world.size != self.world.size:
                raise ValueError(f"dataset {cfg.data} has {self.ds.world.size}px images, "
                                 f"--world={cfg.world} needs {self.world.size}px: pass the "
                                 f"dataset's world")
            recs = self.ds.records()
            rng = np.random.default_rng(cfg.seed)
            self.pools = {}
            for t in self.counts:
                task, family = synth.stream_task(t)  # a family stream: its family's records
                pool = [i for i, r in enumerate(recs) if r["split"] == "train" and r["task"] == task
                        and family in (None, r["family"])]
                if not pool:
                    raise ValueError(f"dataset {cfg.data} has no train samples of task {t!r} "
                                     f"that the mix needs")
                self.pools[t] = rng.permutation(pool)

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


def to_device(batch, device):  # non-blocking: from pinned memory, the host need not wait
    return {task: {k: v.to(device, non_blocking=True) for k, v in sub.items()}
            for task, sub in batch.items()}


def loader(stream, first, stride, num_workers, device):
    """Micro-batches first, first + stride, first + 2 stride, ... made by background workers; on
    CUDA in pinned memory, so that copying one to the GPU does not make the host wait for it."""
    return iter(torch.utils.data.DataLoader(
        stream, batch_size=None, sampler=range(first, 1 << 40, stride), num_workers=num_workers,
        pin_memory=device.type == "cuda"))


# ----------------------------------------------------------------------------- the run's setup

def setup_distributed(cfg):
    """(rank, world_size, device); torchrun sets RANK/WORLD_SIZE, plain python runs one process."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def reached_parameters(model, mix, cfg, tok, mcfg):
    """Names of the parameters a micro-batch of `mix` gives a gradient: one backward over one
    sample of each task, under a forked RNG so the run's random stream is untouched. A flow-only
    recipe never reaches the LM head; an understanding-only stage never reaches the flow head."""
    world = synth.get_world(cfg.world)
    device = next(model.parameters()).device
    tasks = [t for t, w in parse_mix(mix).items() if w > 0]
    samples = [synth.make_sample(world, t, "train", 0, cfg.seed) for t in tasks]
    batch = to_device(collate(samples, mcfg, tok), device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.loss(batch)[0].backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return reached


def freeze_unreached(model, mixes, cfg, tok, mcfg):
    """Freeze what no stage of the recipe reaches, so that DDP never waits for its gradient, and
    say whether some stage still leaves a trainable parameter without one: only then (the staged
    recipe) does DDP need find_unused_parameters and its search of the autograd graph at every
    step. (static_graph would skip that search too, but it breaks gradient accumulation under
    no_sync: pytorch/pytorch#143580.) Returns (names frozen, find_unused_parameters)."""
    reached = [reached_parameters(model, mix, cfg, tok, mcfg) for mix in mixes]
    frozen = [n for n, p in model.named_parameters() if not any(n in r for r in reached)]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    find_unused = any(n not in r for r in reached
                      for n, p in model.named_parameters() if p.requires_grad)
    return frozen, find_unused


def compiles(cfg, device):  # whether the training step runs under torch.compile
    return cfg.compile == 1 or (cfg.compile == -1 and device.type == "cuda")


def checked_rates(model, counts, cfg, seconds, peak, device):
    """kernels.rates, and the peak they divide by: a measured peak that the run beats (MFU above 1)
    was timed while other work slowed the device, so it is measured again and the higher kept."""
    r = kernels.rates(model, counts, cfg.batch_size, seconds, peak)
    if r["mfu"] > 1 and not cfg.peak_tflops:
        peak = max(peak, kernels.measured_matmul_flops(device, fresh=True))
        r = kernels.rates(model, counts, cfg.batch_size, seconds, peak)
    return r, peak


def peak_flops(cfg, device):
    """The FLOP/s that MFU divides by: --peak_tflops if given, else measured on this device."""
    return cfg.peak_tflops * 1e12 if cfg.peak_tflops else kernels.measured_matmul_flops(device)


CODEBOOK_IMAGES = 1000  # training images whose patches fit dual_tokens' codebook


def init_run(cfg, mcfg, run_dir, device, master):
    """(model, EMA weights, optimizer, first step): this run's newest checkpoint with --resume,
    else a fresh model (seeded by --seed), from --init_from's EMA weights when given."""
    torch.manual_seed(cfg.seed)
    model = UMM(mcfg).to(device)
    # claim_run_dir has checked the folder: --resume with no checkpoint (only the log of a run
    # that died before its first one) starts over from step 0
    resume_from = newest_checkpoint(run_dir) if cfg.resume else None
    if RECIPES[cfg.recipe]["init"] and not cfg.init_from and not resume_from:
        raise ValueError(f"recipe {cfg.recipe!r} tunes a pretrained model: pass "
                         f"--init_from=CHECKPOINT")
    start = 0
    if resume_from:
        meta = read_meta(resume_from)
        check_resume(meta, cfg, mcfg, resume_from)
        load_weights(resume_from, "model.safetensors", model)
        start = meta["step"]
    elif cfg.init_from:
        src = newest_checkpoint(cfg.init_from)
        if src is None:
            raise ValueError(f"--init_from={cfg.init_from}: no checkpoint there (a step_* folder "
                             f"or a run folder)")
        load_weights(src, "ema.safetensors", model)  # tune from the EMA weights, as released
    elif mcfg.dual_tokens:  # a fresh run fits its discrete tokenizer first (saved with the weights)
        world = synth.get_world(cfg.world)
        images = [synth.make_sample(world, "vqa", "train", i, cfg.seed)["image"]
                  for i in range(CODEBOOK_IMAGES)]
        err = model.fit_codebook(torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float()
                                 .div(127.5).sub(1).to(device))
        if master:
            print(f"codebook: {mcfg.codebook} codes fitted to the patches of {len(images)} "
                  f"training images, mean squared error {err:.2g} per value (pixels in [-1, 1])")
    if resume_from:
        ema_file = read_weights(resume_from, "ema.safetensors", model)  # checked as weights are
        ema = {k: v.to(device) for k, v in ema_file.items()}
    else:
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    # matrices decay; the 1-D norms and embeddings don't. Each group's lr is the schedule's
    # times its lr_scale: the generation side's can differ (--gen_lr_scale)
    groups = []
    for gen, scale in ((False, 1.0), (True, cfg.gen_lr_scale)):
        params = [p for n, p in model.named_parameters() if generation_side(n) == gen]
        groups += [{"params": [p for p in params if p.dim() >= 2], "lr_scale": scale,
                    "weight_decay": cfg.weight_decay},
                   {"params": [p for p in params if p.dim() < 2], "lr_scale": scale,
                    "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")
    if resume_from:
        try:
            opt.load_state_dict(torch.load(os.path.join(resume_from, "optim.pt"),
                                           map_location=device))
        except Exception as e:
            raise ValueError(f"checkpoint file {resume_from}/optim.pt is missing or corrupt: {e}"
                             ) from None
        # the loaded groups carry the saved run's settings (lr_scale, weight decay, betas):
        # this run's keys win, as README's resume rule says
        for g, fresh in zip(opt.param_groups, groups):
            g.update({k: v for k, v in fresh.items() if k != "params"})
    return model, ema, opt, start


# ------------------------------------------------------------------------ checkpoint, eval, log

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) weights, all tensors in one call (on a GPU a few kernels
    instead of one per tensor), paired by name: a resumed ema comes in the checkpoint's order."""
    live = model.state_dict()
    torch._foreach_lerp_([ema[k] for k in live], [v.float() for v in live.values()], 1 - decay)


def run_meta(cfg, mcfg):  # what a checkpoint's config.json records besides its step
    return {"model": asdict(mcfg), "train": asdict(cfg),
            "world": asdict(synth.get_world(cfg.world)),
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "synth": synth.VERSION}}


def save_checkpoint(run_dir, step, model, ema, opt, meta, tok, keep):
    """Write step_NNNNNN under a temporary name and rename it when complete: a crash mid-save
    leaves the previous checkpoints untouched and no half-written folder that looks complete."""
    final = os.path.join(run_dir, f"step_{step:06d}")
    tmp = os.path.join(run_dir, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    if os.environ.get("NANOUMM_TEST_KILL_IN_SAVE") == str(step):  # test_train.py's crash test:
        os.kill(os.getpid(), signal.SIGKILL)  # it dies with this checkpoint half written
    ema_weights = {k: v.cpu().contiguous() for k, v in ema.items()}
    save_file(ema_weights, os.path.join(tmp, "ema.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:  # last: it marks a complete folder
        json.dump({**meta, "step": step}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep:  # 0 keeps every checkpoint
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def saves_at(cfg, done):
    """Is a checkpoint written after `done` steps? Every save_every (0: never), and at the end;
    never in a --bench run."""
    if cfg.bench:
        return False
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


# ----------------------------------------------------------------------------- eval during training

@torch.no_grad()
def evaluate_run(cfg, model, ema, tok, run_dir, step, device, rank, world_size):
    """With the EMA weights: eval.evaluate on small val sets (each rank scores its share, the
    records are gathered) and, on rank 0, its table and a labelled picture of generations and
    edits (eval.draw_picture) under run_dir/samples/. Returns the headline scores (TrainLog logs
    them), or None on the other ranks."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(live[k].dtype) for k, v in ema.items()})
    model.eval()
    world = synth.get_world(cfg.world)
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    # small counts keep an eval of the tiny preset to seconds; python eval.py scores fully
    results = evaluate(model, tok, world, "val", n=128, n_t2i=28, samples_per_prompt=2, n_edit=32,
                       device=device, rank=rank, world_size=world_size, progress=False,
                       picture=os.path.join(run_dir, "samples", f"step_{step:06d}.png"))
    model.load_state_dict(live)
    if rank != 0:
        return None
    table = to_markdown(results, f"step {step}, EMA weights").encode()
    save_atomic(os.path.join(run_dir, "samples", f"step_{step:06d}.md"), lambda f: f.write(table))
    return headline(results)


def run_header(run_dir, cfg, model, plan, device, use_compile, start, peak):
    """The run's first line on the terminal: what runs where (the batch plan: micro-batch, ranks,
    accumulation), from which step, and what MFU divides by."""
    n = model.num_params()["total"]
    measured = "" if cfg.peak_tflops else " (measured matmul)"
    return (f"run {run_dir}: recipe {cfg.recipe}, preset {cfg.preset}, {n / 1e6:.2f} M params, "
            f"{plan} on {device}, compile {use_compile}, from step {start}, "
            f"MFU against {peak / 1e12:.4g} TFLOP/s{measured}")


LOGGED = ("ce", "flow", "flow_t0", "flow_t1", "flow_t2", "flow_t3",  # flow_tk: t in [k/4, (k+1)/4)
          "sem_cells", "gen_cells", "layout")


class TrainLog:
    """The progress bar; the logged losses, summed on the device between log lines (reading one
    would make the host wait for the GPU, which then idles while the host queues the next
    micro-batch's kernels); one line per log step in run_dir/log.jsonl (what a rerun reproduces),
    its timings in run_dir/speed.jsonl (what none does), and on the terminal. Only rank 0 shows
    and writes anything (the others pass run_dir None)."""

    def __init__(self, cfg, run_dir, device, world_size, start):
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=run_dir is None,
                        dynamic_ncols=True, desc=cfg.recipe)
        self.files = None
        if run_dir is not None:  # a resumed run logs again the steps after its checkpoint
            self.files = open_logs(run_dir, start)
        self.cfg = cfg
        self.run_dir = run_dir
        self.world_size = world_size
        self.sums = torch.zeros(2, len(LOGGED), device=device)  # (sum, count) per logged loss
        self.nan = torch.full((), math.nan, device=device)  # a loss a micro-batch does not have
        self.last_step = start
        self.t_last = time.perf_counter()

    def add(self, parts):
        """One micro-batch's loss parts, as one vector, NaN where it has none (no such task, or a
        t-bin no sample fell in), so the log costs a few GPU kernels per micro-batch."""
        v = torch.stack([parts[k].float() if k in parts else self.nan for k in LOGGED])
        seen = ~v.isnan()
        self.sums[0] += torch.where(seen, v, 0.0)
        self.sums[1] += seen

    def means(self):  # the mean of each loss since the last line, over all ranks; then reset
        if self.world_size > 1:
            dist.all_reduce(self.sums)
        means = {k: (self.sums[0, i] / self.sums[1, i]).item() for i, k in enumerate(LOGGED)
                 if self.sums[1, i] > 0}
        self.sums = torch.zeros_like(self.sums)
        return means

    def lap(self, step):  # seconds per step since the last line
        dt = (time.perf_counter() - self.t_last) / (step - self.last_step)
        self.last_step = step
        self.t_last = time.perf_counter()
        return dt

    def write(self, rec, speed, eta):
        if self.files is None:
            return
        for file, line in zip(self.files, (rec, {"step": rec["step"], **speed})):
            file.write(json.dumps(line) + "\n")
            file.flush()
        mfu = kernels.mfu_text(speed["mfu"], bool(self.cfg.peak_tflops))
        tqdm.write(f"step {rec['step']:6d} | ce {fmt(rec, 'ce')} | flow {fmt(rec, 'flow')} | "
                   f"cells {fmt(rec, 'sem_cells')}/{fmt(rec, 'gen_cells')} | "
                   f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.2f} | "
                   f"{speed['ms_per_step']:.0f} ms | {speed['tokens_per_s']:,.0f} tok/s | "
                   f"{speed['images_per_s']:,.1f} img/s | mfu {mfu} | eta {eta / 60:.1f} min")

    def write_eval(self, step, scores):  # the eval's headline scores, as a line of log.jsonl
        if self.files is None:
            return
        self.files[0].write(json.dumps({"step": step, **{f"val_{k}": v for k, v in scores.items()}})
                            + "\n")
        self.files[0].flush()
        shown = ", ".join(f"{k} {num(v)}" for k, v in scores.items())
        tqdm.write(f"eval step {step} (EMA): {shown}; table and picture in "
                   f"{self.run_dir}/samples/step_{step:06d}.md/.png")

    def close(self):
        self.bar.close()
        for file in self.files or ():
            file.close()


def fmt(rec, key):  # a logged loss, or "-" where the step had none (a stage without that task)
    return f"{rec[key]:.4f}" if key in rec else "-"


CURVES = (("training losses (log scale)", True, ("ce", "flow", "sem_cells", "gen_cells")),
          ("val scores (small sets, EMA)", False,
           ("val_vqa_acc", "val_shapeeval", "val_edit_success", "val_uniedit_success")))
COLORS = ((230, 80, 80), (80, 160, 240), (90, 200, 110), (240, 190, 60))


def draw_curves(run_dir):
    """run_dir/curves.png from its log.jsonl: the losses and the val scores of the evals during
    training against the step, one panel each, drawn with PIL (no plotting library needed)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    W, H, M = 420, 260, 44  # panel size and margin, px
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (len(CURVES) * W, H), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    last = max(r["step"] for r in lines)
    for p, (title, log_y, keys) in enumerate(CURVES):
        series = {k: [(r["step"], r[k]) for r in lines if r.get(k) is not None
                      and (not log_y or r[k] > 0)] for k in keys}
        values = [v for pts in series.values() for _, v in pts]
        if not values:
            continue
        y_of = math.log10 if log_y else float
        lo, hi = (math.floor(y_of(min(values))), math.ceil(y_of(max(values)))) if log_y else (0, 1)
        hi = max(hi, lo + 1)
        x0, x1, y0, y1 = p * W + M, (p + 1) * W - 10, H - M + 10, 24
        px = lambda step: x0 + (x1 - x0) * step / last
        py = lambda v: y0 - (y0 - y1) * (y_of(v) - lo) / (hi - lo)
        pen.text((x0, 6), title, fill=(0, 0, 0), font=font)
        pen.rectangle([x0, y1, x1, y0], outline=(160, 160, 160))
        ticks = [10.0 ** e for e in range(lo, hi + 1)] if log_y else [0, 0.25, 0.5, 0.75, 1]
        for v in ticks:
            pen.line([x0, py(v), x1, py(v)], fill=(230, 230, 230))
            pen.text((p * W + 4, py(v) - 6), f"{v:g}", fill=(0, 0, 0), font=font)
        pen.text((x0, y0 + 4), "0", fill=(0, 0, 0), font=font)
        pen.text((x1 - 40, y0 + 4), f"step {last}", fill=(0, 0, 0), font=font)
        for j, (k, pts) in enumerate(series.items()):
            color = COLORS[j % len(COLORS)]
            if len(pts) > 1:
                pen.line([(px(s), py(v)) for s, v in pts], fill=color, width=2)
            for s, v in pts[-1:]:  # the newest value, as a dot
                pen.ellipse([px(s) - 2, py(v) - 2, px(s) + 2, py(v) + 2], fill=color)
            pen.text((x0 + 92 * j, y0 + 18), k.removeprefix("val_"), fill=color, font=font)
    save_atomic(os.path.join(run_dir, "curves.png"), lambda f: sheet.save(f, format="PNG"))


# ----------------------------------------------------------------------------- training

def lr_at(cfg, step):
    """Linear warmup, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    q = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * q))


def stage_at(cfg, step):
    """(stage index, mix, trained) of a step: each stage of the recipe takes its fraction of
    max_steps; trained: the prefixes of the parameters it trains, () for all."""
    stages = RECIPES[cfg.recipe]["stages"]
    edge = 0.0
    for i, (frac, mix, *trained) in enumerate(stages):
        edge += frac * cfg.max_steps
        if step < round(edge) or i == len(stages) - 1:
            return i, (cfg.mix or mix), tuple(*trained)


def train(cfg, after_step=None):
    """Train as cfg says; returns the run folder. after_step(step, model, stream), if given, runs
    after each optimizer step (--bench times the loop with it)."""
    check_config(cfg)
    # the batch plan before any process group exists: a batch that cannot be split exits cleanly
    mixes = [cfg.mix or stage[1] for stage in RECIPES[cfg.recipe]["stages"]]
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = plan_micro_batch(cfg.batch_size, cfg.micro_batch, ranks, mixes)
    plan = f"batch {cfg.batch_size} = micro-batch {micro} x {ranks} rank(s) x accumulation {accum}"
    if micro != cfg.micro_batch:
        plan += f" (micro_batch {cfg.micro_batch} lowered to fit)"
    cfg = dataclasses.replace(cfg, micro_batch=micro)
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    run_dir = os.path.join(cfg.out_dir, cfg.name or cfg.recipe)
    tok = synth.get_tokenizer(cfg.world)
    mcfg = model_config(cfg, tok.get_vocab_size())
    if master:
        claim_run_dir(run_dir, cfg.resume)
    model, ema, opt, start = init_run(cfg, mcfg, run_dir, device, master)
    if start >= cfg.max_steps:
        if master:
            print(f"run {run_dir} has finished: its newest checkpoint is of the last step "
                  f"(--max_steps={cfg.max_steps}); nothing to resume")
            release(run_dir)
        if world_size > 1:
            dist.destroy_process_group()
        return run_dir
    frozen, find_unused = freeze_unreached(model, mixes, cfg, tok, mcfg)
    use_compile = compiles(cfg, device)
    ddp = DDP(model, find_unused_parameters=find_unused) if world_size > 1 else None
    loss_fn = torch.compile(ddp or model) if use_compile else (ddp or model)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # CPU: fp32
    peak = peak_flops(cfg, device)
    if master:
        print(run_header(run_dir, cfg, model, plan, device, use_compile, start, peak))
        if frozen:
            print(f"frozen, as no task of the recipe reaches them: {', '.join(frozen)}")
        if ddp is not None:
            print(f"DDP over {world_size} ranks, find_unused_parameters={find_unused}")
    stage = None
    log = TrainLog(cfg, run_dir if master else None, device, world_size, start)
    for step in range(start, cfg.max_steps):
        stage_now, mix, trained = stage_at(cfg, step)
        if stage_now != stage:  # a new stage (or the start) streams from this step's micro-batch
            stage = stage_now
            stream = Stream(cfg, mix, tok, mcfg)
            data = loader(stream, step * accum * world_size + rank, world_size, cfg.num_workers,
                          device)
            # a stage that trains only some parameters holds the others still: their gradients
            # are dropped before clipping, and AdamW skips a parameter without one (no decay)
            held = [p for n, p in model.named_parameters()
                    if p.requires_grad and trained and not n.startswith(trained)]
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step) * g["lr_scale"]
        model.train()
        step_loss = torch.zeros((), device=device)  # on the device until the step's one wait
        for a in range(accum):
            chunk = step * accum * world_size + a * world_size + rank  # this micro-batch's position
            batch = to_device(next(data), device)
            torch.manual_seed(synth.sample_seed("noise", cfg.seed, chunk))  # its noise, t, dropout
            noise = model.draw_noise(batch)  # outside the compiled loss: same draws compiled or not
            # gradients are all-reduced in the last micro-batch's backward only (no_sync holds
            # both passes: DDP decides in the forward whether the backward reduces)
            sync = ddp.no_sync() if ddp is not None and a < accum - 1 else contextlib.nullcontext()
            with sync:
                with amp:
                    loss, parts = loss_fn(batch, noise)
                (loss / accum).backward()
            step_loss += loss.detach() / accum
            log.add(parts)
        if world_size > 1:  # every rank sees the global loss, so all of them stop together on a NaN
            dist.all_reduce(step_loss)
            step_loss /= world_size
        for p in held:
            p.grad = None
        # grad_clip 0 clips at infinity: the norm is still computed (and logged), the gradients kept
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        step_loss, gnorm = torch.stack([step_loss.float(), gnorm.float()]).tolist()  # the wait
        if not math.isfinite(step_loss):  # stop before the update: nothing broken is saved
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; the run stopped "
                                     f"before updating the weights and saved nothing from it: "
                                     f"lower --lr or check the data")
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.ema)
        done = step + 1
        if after_step is not None:
            after_step(done, model, stream)
        if logs_at(cfg, done):
            losses = log.means()  # waits for the device
            dt = log.lap(done)
            speed, peak = checked_rates(model, stream.counts, cfg, dt, peak, device)
            rec = {"step": done, **losses, "lr": lr_at(cfg, step), "grad_norm": gnorm,
                   "stage": stage}
            log.write(rec, {**speed, "peak_tflops": peak / 1e12}, eta=dt * (cfg.max_steps - done))
        log.bar.update(1)
        # eval before the checkpoint: a run stopped between the two redoes both, eval line included
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            scores = evaluate_run(cfg, model, ema, tok, run_dir, done, device, rank, world_size)
            log.write_eval(done, scores)
            if master:
                draw_curves(run_dir)
        if saves_at(cfg, done):
            if master:
                save_checkpoint(run_dir, done, model, ema, opt, run_meta(cfg, mcfg), tok, cfg.keep)
            if world_size > 1:
                dist.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
    log.close()
    if master:
        release(run_dir)
    if world_size > 1:
        # DDP's reducer first: the group's destructor waits for gloo's threads, which may need the
        # GIL; run from the reducer it holds the GIL (a rare hang), from destroy_process_group not
        del ddp, loss_fn
        dist.destroy_process_group()
    return run_dir


# ----------------------------------------------------------------------------- --bench

BENCH_WARMUP = 10  # steps --bench runs before timing: compilation and autotuning happen in them


class StepClock:
    """train()'s after_step for --bench: times the steps after the warm-up and, after the last,
    makes a row of README's speed table (kept as `row`; the model is not kept alive past train)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.start = BENCH_WARMUP  # step numbers count from 1: the clock starts after step 10
        self.stop = BENCH_WARMUP + cfg.bench

    def __call__(self, step, model, stream):
        device = next(model.parameters()).device
        if step in (self.start, self.stop) and device.type == "cuda":
            torch.cuda.synchronize(device)
        if step == self.start:  # start the clock and the counts once warm
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.graphs = dynamo_counters["stats"]["unique_graphs"]
            self.t0 = time.perf_counter()
        if step == self.stop:
            seconds = (time.perf_counter() - self.t0) / (self.stop - self.start)
            peak = peak_flops(self.cfg, device)
            peak_mem = None  # GiB, on CUDA
            if device.type == "cuda":
                peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30
            speed, peak = checked_rates(model, stream.counts, self.cfg, seconds, peak, device)
            self.row = {**speed, "peak_tflops": peak / 1e12, "peak_mem_gib": peak_mem,
                        "recompiles": dynamo_counters["stats"]["unique_graphs"] - self.graphs}
            self.device = device


def bench(cfg):
    """--bench=N: BENCH_WARMUP + N steps of train()'s own loop in a temporary folder, with no
    eval and no checkpoint, the last N timed; prints one row of README's speed table and
    returns it (on rank 0; None on the others)."""
    clock = StepClock(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(cfg, out_dir=tmp, resume=False, max_steps=clock.stop,
                                  log_every=clock.stop, eval_every=0, save_every=0)
        train(run, after_step=clock)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: rank 0 prints
        return None
    setup = "compile" if compiles(cfg, clock.device) else "eager"
    setup += " + kernels" * cfg.kernels
    setup += " + flex" if cfg.flex and clock.device.type == "cuda" else " + sdpa"
    kernels.print_bench_row(cfg.preset, setup, clock.device, clock.row)
    return clock.row


def main(argv):
    """python train.py: train, or with --bench time the training step."""
    cfg = parse_args(argv)
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError) as e:  # bad input, or a diverged run: one line
        # under torchrun every rank meets the same error: rank 0 says it
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
