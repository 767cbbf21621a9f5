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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters as dynamo_counters
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kernels
import synth
from eval import evaluate, headline, on, to_markdown, to_uint8
from model import TASK_GROUP, UMM, UMMConfig, collate, load_weights, newest_checkpoint, read_meta


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
    world: str = "tiny"  # the synth world: tiny (32 px) or default (64 px)
    data: str = ""  # a synth.py dataset folder; default: samples made on the fly
    mix: str = ""  # task weights "vqa:1,t2i:1,edit:1"; default: the recipe's
    num_workers: int = 0  # DataLoader worker processes making batches
    # optimisation
    batch_size: int = 32  # global, in samples
    micro_batch: int = 32  # per rank and pass; accumulation = batch_size / (micro_batch x ranks)
    max_steps: int = 6000  # the tiny base of the Uni-Edit experiment (README)
    lr: float = 3e-4  # 1e-3 and above left the tiny model blind: it answered from the question
    min_lr: float = 3e-5  # the cosine schedule's end, at max_steps
    warmup: int = 100  # steps of linear warm-up
    weight_decay: float = 0.05  # AdamW's, on matrices only
    beta2: float = 0.99  # AdamW's (beta1 0.9)
    grad_clip: float = 1.0  # max global gradient norm
    ema: float = 0.995  # decay per step of the EMA weights that eval and sampling use
    # model (0 or -1: the preset's or recipe's value)
    width: int = 0  # the model's size dial; depth and heads follow it
    mot: bool = False  # BAGEL's mixture-of-transformers (model.py)
    refiner_layers: int = 0  # Ovis-U1's refiner blocks (model.py)
    src_pixel_dropout: float = -1.0  # how often training drops an edit's clean pixel source
    kernels: bool = False  # the fused Triton ops of kernels.py (on CUDA)
    flex: bool = True  # FlexAttention block masks on CUDA; 0: SDPA with a dense mask
    # speed
    compile: int = -1  # -1: on CUDA only
    bench: int = 0  # > 0: time this many steps after a warm-up, print a speed row, save nothing
    device: str = ""  # default: cuda if available, else cpu
    # logging, eval, checkpoints
    log_every: int = 50  # steps per line of log.jsonl and the terminal
    eval_every: int = 1200  # 0: never
    save_every: int = 1200  # 0: never (the run keeps no checkpoint)
    keep: int = 2  # newest checkpoints kept
    peak_tflops: float = 0.0  # what MFU divides by; 0: this device's measured dense matmul rate


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

# A recipe is a few lines of data and weights. Stages split max_steps by their fractions.
RECIPES = {
    "pretrain": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=False),  # answers need most steps
    "uniedit": dict(stages=[(1.0, "uniedit:1")], init=True,
                    model=dict(ce_weight=0.0, src_pixel_dropout=1.0)),
    "simple_edit": dict(stages=[(1.0, "edit:1")], init=True),
    "mixed": dict(stages=[(1.0, "vqa:2,t2i:1,edit:1")], init=True),
    "staged": dict(stages=[(0.3, "vqa:1"), (0.3, "t2i:1,edit:1"), (0.4, "vqa:1,t2i:1,edit:1")],
                   init=False),
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
    mc = UMMConfig.preset(cfg.preset, vocab_size=vocab_size,
                          image_size=synth.get_world(cfg.world).size,
                          **RECIPES[cfg.recipe].get("model", {}))
    overrides = dict(mot=cfg.mot, refiner_layers=cfg.refiner_layers, kernels=cfg.kernels,
                     flex=cfg.flex)
    if cfg.width:
        overrides.update(width=cfg.width, depth=0, heads=0)
    if cfg.src_pixel_dropout >= 0:
        overrides["src_pixel_dropout"] = cfg.src_pixel_dropout
    return dataclasses.replace(mc, **overrides)


# ----------------------------------------------------------------------------- data

def parse_mix(mix):
    out = {}
    for part in mix.split(","):
        task, _, w = part.partition(":")
        if task not in synth.TASKS:
            raise ValueError(f"mix names unknown task {task!r}: choose from "
                             f"{', '.join(synth.TASKS)}")
        out[task] = float(w or 1)
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
                pool = [i for i, r in enumerate(recs) if r["split"] == "train" and r["task"] == t]
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


def compiles(cfg, device):  # whether the training step runs under torch.compile
    return cfg.compile == 1 or (cfg.compile == -1 and device.type == "cuda")


def peak_flops(cfg, device):
    """The FLOP/s that MFU divides by: --peak_tflops if given, else measured on this device."""
    return cfg.peak_tflops * 1e12 if cfg.peak_tflops else kernels.measured_matmul_flops(device)


def init_run(cfg, mcfg, run_dir, device, master):
    """(model, EMA weights, optimizer, first step): this run's newest checkpoint with --resume,
    else a fresh model (seeded by --seed), from --init_from's EMA weights when given."""
    torch.manual_seed(cfg.seed)
    model = UMM(mcfg).to(device)
    resume_from = newest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: no complete checkpoint in {run_dir}; drop --resume to start "
                         f"fresh")
    if not cfg.resume and newest_checkpoint(run_dir) and master:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it or "
                         f"--name=NAME for a new run (nothing is overwritten)")
    if RECIPES[cfg.recipe]["init"] and not cfg.init_from and not resume_from:
        raise ValueError(f"recipe {cfg.recipe!r} tunes a pretrained model: pass "
                         f"--init_from=CHECKPOINT")
    start = 0
    if resume_from:
        meta = read_meta(resume_from)
        if meta["model"] != asdict(mcfg):
            diff = [k for k in meta["model"] if meta["model"][k] != asdict(mcfg).get(k)]
            raise ValueError(f"checkpoint {resume_from}/config.json has a different model config "
                             f"({', '.join(diff)}) than this run")
        for key in ("recipe", "batch_size", "seed", "world", "mix", "data"):
            if meta["train"][key] != getattr(cfg, key):
                raise ValueError(f"checkpoint {resume_from}/config.json has "
                                 f"{key}={meta['train'][key]!r}, this run "
                                 f"{key}={getattr(cfg, key)!r}: resume with the same value")
        load_weights(resume_from, "model.safetensors", model)
        start = meta["step"]
    elif cfg.init_from:
        src = newest_checkpoint(cfg.init_from)
        if src is None:
            raise ValueError(f"--init_from={cfg.init_from}: no checkpoint there (a step_* folder "
                             f"or a run folder)")
        load_weights(src, "ema.safetensors", model)  # tune from the EMA weights, as released
    if resume_from:
        ema_file = load_file(os.path.join(resume_from, "ema.safetensors"))
        ema = {k: v.to(device) for k, v in ema_file.items()}
    else:
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    # matrices decay; the 1-D norms and embeddings don't
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")
    if resume_from:
        try:
            opt.load_state_dict(torch.load(os.path.join(resume_from, "optim.pt"),
                                           map_location=device))
        except Exception as e:
            raise ValueError(f"checkpoint file {resume_from}/optim.pt is missing or corrupt: {e}"
                             ) from None
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
    ema_weights = {k: v.cpu().contiguous() for k, v in ema.items()}
    save_file(ema_weights, os.path.join(tmp, "ema.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:  # last: it marks a complete folder
        json.dump({**meta, "step": step}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(glob.glob(os.path.join(run_dir, "step_[0-9]*")))[:-keep]:
        shutil.rmtree(old)
    return final


@torch.no_grad()
def evaluate_run(cfg, model, ema, tok, mcfg, run_dir, step, device, rank, world_size):
    """With the EMA weights: eval.evaluate on small val sets (each rank scores its share, the
    records are gathered) and, on rank 0, its table, the headline numbers in log.jsonl and a grid
    of generations and edits under run_dir/samples/."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(live[k].dtype) for k, v in ema.items()})
    model.eval()
    world = synth.get_world(cfg.world)
    # small counts keep an eval of the tiny preset to seconds; python eval.py scores fully
    results = evaluate(model, tok, world, "val", n=128, n_t2i=28, samples_per_prompt=2, n_edit=32,
                       device=device, rank=rank, world_size=world_size, progress=False)
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        rows = []
        g = torch.Generator().manual_seed(cfg.seed)
        for task in ("t2i", "edit", "uniedit"):
            samples = [synth.make_sample(world, task, "val", i) for i in range(8)]
            sub = on(device, collate(samples, mcfg, tok)[TASK_GROUP[task]])
            made = model.sample(TASK_GROUP[task], sub, steps=20, generator=g)
            made = to_uint8(made)  # (8, S, S, 3)
            blank = np.zeros_like(made[0])
            rows.append([s["image"] if s["image"] is not None else blank for s in samples])
            rows.append(list(made))
            rows.append([s["target"] for s in samples])
        grid = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
        from PIL import Image
        big = Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)
        big.save(os.path.join(run_dir, "samples", f"step_{step:06d}.png"))
        with open(os.path.join(run_dir, "samples", f"step_{step:06d}.md"), "w") as f:
            f.write(to_markdown(results, f"step {step}, EMA weights"))
        scores = headline(results)
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in scores.items()}}) + "\n")
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        tqdm.write(f"eval step {step} (EMA): {numbers}; table and grid in "
                   f"{run_dir}/samples/step_{step:06d}.md/.png")
    model.load_state_dict(live)


def run_header(run_dir, cfg, model, world_size, device, accum, use_compile, start, peak):
    """The run's first line on the terminal: what runs where, from which step, and what MFU
    divides by."""
    n = model.num_params()["total"]
    measured = "" if cfg.peak_tflops else " (measured matmul)"
    return (f"run {run_dir}: recipe {cfg.recipe}, preset {cfg.preset}, {n / 1e6:.2f} M params, "
            f"{world_size} rank(s) on {device}, accumulation {accum}, compile {use_compile}, "
            f"from step {start}, MFU against {peak / 1e12:.4g} TFLOP/s{measured}")


LOGGED = ("ce", "flow", "flow_t0", "flow_t1", "flow_t2", "flow_t3")  # flow_tk: t in [k/4, (k+1)/4)


class TrainLog:
    """The progress bar; the logged losses, summed on the device between log lines (reading one
    would make the host wait for the GPU, which then idles while the host queues the next
    micro-batch's kernels); one line per log step in run_dir/log.jsonl and on the terminal. Only
    rank 0 shows and writes anything (the others pass run_dir None)."""

    def __init__(self, cfg, run_dir, device, world_size, start):
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=run_dir is None,
                        dynamic_ncols=True, desc=cfg.recipe)
        self.file = None
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            self.file = open(os.path.join(run_dir, "log.jsonl"), "a")
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

    def write(self, rec, eta):
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        tqdm.write(f"step {rec['step']:6d} | ce {fmt(rec, 'ce')} | flow {fmt(rec, 'flow')} | "
                   f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.2f} | "
                   f"{rec['ms_per_step']:.0f} ms | {rec['tokens_per_s']:,.0f} tok/s | "
                   f"{rec['images_per_s']:,.1f} img/s | mfu {100 * rec['mfu']:.1f}% | "
                   f"eta {eta / 60:.1f} min")

    def close(self):
        self.bar.close()
        if self.file is not None:
            self.file.close()


def fmt(rec, key):  # a logged loss, or "-" where the step had none (a stage without that task)
    return f"{rec[key]:.4f}" if key in rec else "-"


# ----------------------------------------------------------------------------- training

def lr_at(cfg, step):
    """Linear warmup, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    q = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * q))


def stage_at(cfg, step):
    """(stage index, mix) of a step: each stage of the recipe takes its fraction of max_steps."""
    stages = RECIPES[cfg.recipe]["stages"]
    edge = 0.0
    for i, (frac, mix) in enumerate(stages):
        edge += frac * cfg.max_steps
        if step < round(edge) or i == len(stages) - 1:
            return i, (cfg.mix or mix)


def train(cfg, after_step=None):
    """Train as cfg says; returns the run folder. after_step(step, model, stream), if given, runs
    after each optimizer step (--bench times the loop with it)."""
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    if cfg.batch_size % (cfg.micro_batch * world_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of "
                         f"micro_batch={cfg.micro_batch} x {world_size} ranks")
    accum = cfg.batch_size // (cfg.micro_batch * world_size)
    run_dir = os.path.join(cfg.out_dir, cfg.name or cfg.recipe)
    tok = synth.get_tokenizer(cfg.world)
    mcfg = model_config(cfg, tok.get_vocab_size())
    model, ema, opt, start = init_run(cfg, mcfg, run_dir, device, master)
    use_compile = compiles(cfg, device)
    ddp = DDP(model, find_unused_parameters=True) if world_size > 1 else None
    loss_fn = torch.compile(ddp or model) if use_compile else (ddp or model)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # CPU: fp32
    peak = peak_flops(cfg, device)
    if master:
        print(run_header(run_dir, cfg, model, world_size, device, accum, use_compile, start, peak))
    stage = None
    log = TrainLog(cfg, run_dir if master else None, device, world_size, start)
    for step in range(start, cfg.max_steps):
        stage_now, mix = stage_at(cfg, step)
        if stage_now != stage:  # a new stage (or the start) streams from this step's micro-batch
            stage = stage_now
            stream = Stream(cfg, mix, tok, mcfg)
            data = loader(stream, step * accum * world_size + rank, world_size, cfg.num_workers,
                          device)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        model.train()
        step_loss = torch.zeros((), device=device)  # on the device until the step's one wait
        for a in range(accum):
            chunk = step * accum * world_size + a * world_size + rank  # this micro-batch's position
            batch = to_device(next(data), device)
            torch.manual_seed(synth.sample_seed("noise", cfg.seed, chunk))  # its noise, t, dropout
            noise = model.draw_noise(batch)  # outside the compiled loss: same draws compiled or not
            sync = ddp.no_sync() if ddp is not None and a < accum - 1 else contextlib.nullcontext()
            with sync, amp:
                loss, parts = loss_fn(batch, noise)
            with sync:
                (loss / accum).backward()
            step_loss += loss.detach() / accum
            log.add(parts)
        if world_size > 1:  # every rank sees the global loss, so all of them stop together on a NaN
            dist.all_reduce(step_loss)
            step_loss /= world_size
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
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
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            losses = log.means()  # waits for the device
            dt = log.lap(done)
            speed = kernels.rates(model, stream.counts, cfg.batch_size, dt, peak)
            rec = {"step": done, **losses, "lr": lr_at(cfg, step), "grad_norm": gnorm, **speed,
                   "stage": stage}
            log.write(rec, eta=dt * (cfg.max_steps - done))
        log.bar.update(1)
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.max_steps):
            if master:
                save_checkpoint(run_dir, done, model, ema, opt, run_meta(cfg, mcfg), tok, cfg.keep)
            if world_size > 1:
                dist.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            evaluate_run(cfg, model, ema, tok, mcfg, run_dir, done, device, rank, world_size)
    log.close()
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
            speed = kernels.rates(model, stream.counts, self.cfg.batch_size, seconds, peak)
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
    except ValueError as e:
        sys.exit(f"error: {e}")
