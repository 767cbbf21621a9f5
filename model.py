"""The nanoUMM model: one transformer trunk that answers questions about images (text,
autoregressive) and generates and edits images (flow matching in pixel space), after BAGEL,
Transfusion and Ovis-U1.

    python model.py          # every preset's size, and the tiny preset's step and decoding times

Sequences (one per sample; fixed length per task and preset, text left-padded with [PAD]):
    vqa:   BOS [sem image] question SEP | answer EOS PAD..     CE on the answer slot
    t2i:   BOS caption BOI [noisy pixel image] EOI             flow loss on the noisy image
    edit:  BOS [sem source] instruction BOI [clean pixel source] [noisy pixel target] EOI
           (edit and uniedit; flow loss on the noisy target)
    with dual_tokens (UniToken) each [sem image] is BOI [codes] SEP [sem image] EOI: the image
    also as the discrete codes of a k-means patch tokenizer (fit_codebook), embedded
Semantic tokens come from a small bidirectional ViT over the clean image plus a 2-layer MLP
adapter; pixel tokens are linear patch embeddings plus a 2-D position embedding (noisy ones also
get the timestep embedding). Attention: causal, bidirectional within an image, and only an
image's own tokens attend to a noisy image; [PAD] and dropped conditions are invisible keys.
Flow matching: x_t = (1 - t) x_0 + t eps, v = eps - x_0, t = sigmoid(N(t_mean, 1)) in training,
MSE on v; the flow head predicts x_0 (an edit's: x_0 minus its pixel source) and
v = (x_t - x_0) / t follows (x-prediction, as JiT);
Euler from t = 1 to 0 with the shift t' = s t / (1 + (s - 1) t).

Batch (from `collate`): a dict {task group: dict of tensors}; groups "vqa", "t2i", "edit" (edit
and uniedit share the edit layout), each present only if the samples hold that task, so any mix of
tasks is one batch:
    tokens (B, T) long: text ids with BOS/BOI/EOI/SEP/EOS placed, [PAD] at image positions
    images (B, 3, S, S) float in [-1, 1]: sem (vqa), source and target (edit), target (t2i)
    <image>_cells (B, N, 3) long: each image's per-cell attribute labels (cell_labels), when all
        the group's samples carry their scenes
    rows (B,): the samples' indices in the list given to collate

API: UMMConfig.preset(name, **overrides); UMM(cfg); collate(samples, cfg, tokenizer) -> batch;
model.loss(batch, noise=model.draw_noise(batch)) -> (total, parts);
model.generate_text(batch["vqa"]) -> answer ids; model.velocity(task, sub, x_t, t, with_text,
with_image); model.guided_velocity(...); model.sample(task, sub, steps, shift, txt_scale,
img_scale); euler(velocity_fn, x, steps, shift); model.num_params() -> {total, matmul};
model.flops_per_sample(task) for MFU; model.fit_codebook(images) (dual_tokens);
load_checkpoint(path) -> (model, tokenizer, meta).

The four small ops of the blocks (RMSNorm, its adaLN form, RoPE, SwiGLU) are plain torch below;
with UMMConfig.kernels the blocks call kernels.py's fused Triton versions of them instead.
"""
import functools
import glob
import json
import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import kernels
import synth

PAD, BOS, EOS, BOI, EOI, SEP = 0, 1, 2, 3, 4, 5  # ids of synth.SPECIALS
TASK_GROUP = {"vqa": "vqa", "t2i": "t2i", "edit": "edit", "uniedit": "edit"}
TASK_GROUP.update({name: TASK_GROUP[synth.stream_task(name)[0]]  # a family stream: its task's
                   for name in synth.FAMILY_STREAMS})
# The classes of the per-cell attribute labels: "empty", then the world's values (every world
# shares them), for shape, colour and size in turn.
CELL_VALUES = [("empty",) + synth.values(synth.get_world("default"), a) for a in synth.ATTRS]
CELL_CLASSES = [len(v) for v in CELL_VALUES]  # [6, 9, 3]


# ----------------------------------------------------------------------------- config

@dataclass
class UMMConfig:
    width: int = 128  # the size dial: depth = width // 32 and heads = width // 64 unless set
    depth: int = 0
    heads: int = 0
    image_size: int = 64  # px per side, that of the synth world
    patch: int = 16  # px per patch side; the world's cell size gives one token per cell
    cells: int = 4  # the synth world's cells per side, the grid of the per-cell attribute labels
    enc_depth: int = 2  # semantic ViT encoder blocks
    head_depth: int = 2  # adaLN flow-head blocks
    # Each layout's fixed text slot, in tokens. synth's longest texts: a probe question + SEP
    # (19), a 6-object test_ood caption (66) and an intelligent edit (34), each with some room.
    vqa_text: int = 24
    t2i_text: int = 68
    edit_text: int = 36
    answer_len: int = 4  # the vqa answer slot (answer + EOS)
    vocab_size: int = 0  # tokenizer.get_vocab_size()
    mot: bool = False  # BAGEL's mixture-of-transformers: own trunk weights for noisy image tokens
    refiner_layers: int = 0  # Ovis-U1's bidirectional refiner; its CLS output joins the t embedding
    # UniToken's unified visual encoding: an image the model reads (the VQA image, the edit's source)
    # enters twice, as discrete codes of a vector-quantised patch tokenizer and as the continuous
    # semantic tokens, laid out BOI [codes] SEP [semantic] EOI. The codebook (codebook patches,
    # fitted by fit_codebook) is saved with the weights.
    dual_tokens: bool = False
    codebook: int = 512
    flex: bool = True  # FlexAttention block masks on CUDA (dense-mask SDPA on CPU)
    kernels: bool = False  # kernels.py's fused Triton ops (CUDA or TRITON_INTERPRET=1), else torch
    rope_base: float = 10000.0
    rope_2d: bool = True  # image tokens turn by their (row, column), not by their sequence place
    # The init std of the learned row and column embeddings added to image tokens (enc_pos,
    # sem_pos, pix_pos). At 0.02 a noisy token's position is ~4% of its norm at t = 1 and stays
    # so in training; 0.5 (on par with the content) cost generation and did not help position
    # questions (README, "More levers").
    pos_std: float = 0.02
    # A noisy image token's own cell embedding (noisy_pos), at this init std; 0: none. At t = 1 a
    # noisy token is a projection of pure noise (norm ~8) and pix_pos (norm ~0.4) is lost in it: a
    # linear probe reads a noisy token's cell at 0.11-0.15 (1/16 is chance), a source's semantic
    # token's at 0.94 (results/levers16k/cell_identity.txt). An edit's source tokens know their
    # cells; a T2I sequence has no token that does. At 0.5 its norm is on par with the noise's.
    # Measured at 16,000 steps it did not teach T2I to place from the words and cost VQA (README,
    # "Two more levers"): kept as that ablation.
    noisy_pos: float = 0.0
    ce_weight: float = 1.0  # total = ce_weight * ce + flow_weight * flow; 0 is flow-only
    flow_weight: float = 1.0
    # Per-cell attribute losses (README, "What it takes to learn the shapes world"): linear heads
    # name each cell's shape, colour and size (or empty) from the semantic tokens the trunk reads
    # (sem_cells) and from the trunk's outputs at the noisy image it generates (gen_cells).
    sem_cell_weight: float = 1.0
    gen_cell_weight: float = 1.0
    # Caption -> layout: a head on the trunk's output at the BOI before the noisy image, which has
    # read the text (and an edit's semantic source) but no pixel it generates, names every cell of
    # the target. It asks the trunk to decide where things go before denoising; 0: off (and no
    # head: a checkpoint's config says whether it has one).
    layout_weight: float = 0.0
    # T2I reads a blank canvas: the clean pixel tokens of an empty image sit before its noisy
    # image, and their projection joins each noisy token, as an edit's pixel source does. The
    # placement probe (eval.py) found that an edit's trunk places what its instruction names from
    # noise, and a T2I trunk places nothing a caption names; the source tokens are what the edit
    # has and T2I lacks (without them an edit's placement at t = 1 falls to 0.02-0.24). Measured
    # at 16,000 steps it did not help T2I and cost the edits (README): kept as that ablation.
    canvas: bool = False
    t_mean: float = 1.0  # training times t = sigmoid(N(t_mean, 1)); > 0: more of them near noise
    t_noise: float = 0.0  # the share of generation samples trained at t = 1 (pure noise) instead
    x_loss: bool = False  # the flow MSE on x_0 (= the v-loss times t^2) instead of on v
    # An edit changes 1-2 of an image's cells and copies the rest; in the per-patch mean the copies
    # outweigh the edit itself ~10 to 1. The patches (and cells) an edit changes weigh this much
    # more than the ones it keeps, in the flow loss and the gen_cells loss; 1: all alike.
    change_weight: float = 4.0
    # An edit's flow head predicts the change to the clean pixel source, x_0 = source + head output,
    # when that source is kept: copying a kept cell is then the head's zero, not a patch it must
    # redraw from 128 numbers (without it the tiny base redrew ~3 of 15 kept objects wrongly).
    src_residual: bool = True
    # Training drops each condition independently, so that guidance has all its terms.
    txt_dropout: float = 0.1
    src_dropout: float = 0.1  # the semantic source tokens
    src_pixel_dropout: float = 0.1  # the clean pixel source tokens (1.0 in the Uni-Edit recipe)

    def __post_init__(self):
        self.depth = self.depth or self.width // 32
        self.heads = self.heads or max(1, self.width // 64)
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width={self.width} must split into heads={self.heads} "
                             f"of even size (for RoPE)")
        if self.pos_std < 0:
            raise ValueError(f"pos_std={self.pos_std} must be >= 0 (the init std of the row and "
                             f"column embeddings)")
        if self.noisy_pos < 0:
            raise ValueError(f"noisy_pos={self.noisy_pos} must be >= 0 (the init std of a noisy "
                             f"token's cell embedding; 0: none)")
        if self.codebook < 1:
            raise ValueError(f"codebook={self.codebook} must be >= 1 (codes per patch tokenizer)")
        if self.change_weight <= 0:
            raise ValueError(f"change_weight={self.change_weight} must be > 0 (1: an edit's "
                             f"changed patches weigh as much as the ones it keeps)")
        if self.image_size % self.patch:
            raise ValueError(f"patch={self.patch} must divide image_size={self.image_size}")
        if (self.image_size // self.patch) % self.cells:
            raise ValueError(f"the {self.image_size // self.patch} patches per side must split "
                             f"evenly into the world's cells={self.cells} per side")

    @staticmethod
    def preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def hidden(self):  # SwiGLU width: 8/3 of the width (the FLOPs of a 4x GELU MLP), rounded to 32
        return (8 * self.width // 3 + 31) // 32 * 32


PRESETS = {
    "tiny": UMMConfig(width=128, image_size=64, patch=16),  # CPU, the tiny world, a patch per cell
    "small": UMMConfig(width=384, image_size=64, patch=8),  # one GPU, the 64x64 default world
    "base": UMMConfig(width=640, image_size=64, patch=8),  # a few GPUs
}


# ----------------------------------------------------------------------------- layouts, attention

TEXT, SEM, CLEAN, NOISY, CODES = 0, 1, 2, 3, 4  # the kind of each position: text or an image kind


class Layout:
    """Where each segment of a task's sequence sits (slices), and the kind of each position."""

    def __init__(self, cfg, task):
        n = (cfg.image_size // cfg.patch) ** 2  # tokens per image
        L = getattr(cfg, f"{task}_text")
        # the image the model reads: its semantic tokens, or UniToken's BOI codes SEP semantic EOI
        read = [("sem", n)]
        if cfg.dual_tokens:
            read = [("code_boi", 1), ("codes", n), ("code_sep", 1), ("sem", n), ("code_eoi", 1)]
        segments = {
            "vqa": [("bos", 1), *read, ("text", L), ("answer", cfg.answer_len)],
            "t2i": [("bos", 1), ("text", L), ("boi", 1), *([("clean", n)] if cfg.canvas else []),
                    ("noisy", n), ("eoi", 1)],
            "edit": [("bos", 1), *read, ("text", L), ("boi", 1), ("clean", n), ("noisy", n),
                     ("eoi", 1)],
        }[task]
        pos = np.cumsum([0] + [k for _, k in segments])
        self.task = task
        self.T = int(pos[-1])
        for name in ("sem", "text", "answer", "clean", "noisy", "codes", "code_boi", "code_sep",
                     "code_eoi"):  # a missing one: the empty slice
            setattr(self, name, slice(self.T, self.T))
        for (name, _), a, b in zip(segments, pos[:-1], pos[1:]):
            setattr(self, name, slice(int(a), int(b)))
        self.kind = torch.full((self.T,), TEXT)  # (T,) long
        self.kind[self.sem] = SEM
        self.kind[self.clean] = CLEAN
        self.kind[self.noisy] = NOISY
        self.kind[self.codes] = CODES
        # The (row, column) RoPE turns each position by (see rope_angles). A text token's are both
        # its place in the sequence, which is 1-D RoPE. With rope_2d an image's token at cell (r, c)
        # has (start + r, start + c): attention then sees "one row up" or "the same cell of the
        # source" as one offset, where in reading order a row is g places and a cell g^2.
        pos = torch.arange(self.T)
        self.coords = torch.stack([pos, pos], 1)  # (T, 2) long
        g = cfg.image_size // cfg.patch
        cell = torch.arange(g * g)
        for image in (self.codes, self.sem, self.clean, self.noisy):
            if cfg.rope_2d and image.stop > image.start:
                self.coords[image] = image.start + torch.stack([cell // g, cell % g], 1)


def mask_rule(kind, vis):
    """The attention rule as a FlexAttention mask_mod; broadcast over index tensors it also builds
    the dense mask. kind (T,): each position's kind; vis (B, T): which keys are visible at all."""

    def rule(b, h, q, kv):
        earlier = (kv <= q) & (kind[kv] != NOISY)  # causal; a noisy image is hidden from the rest
        same_image = (kind[q] == kind[kv]) & (kind[kv] != TEXT)  # bidirectional within an image
        return vis[b, kv] & (earlier | same_image)

    return rule


def attention_mask(kind, vis, flex):  # kind (T,), vis (B, T) -> BlockMask, or bool (B, 1, T, T)
    B, T = vis.shape
    if flex:
        return create_block_mask(mask_rule(kind, vis), B, None, T, T, device=vis.device)
    i = torch.arange(T, device=vis.device)
    b = torch.arange(B, device=vis.device)[:, None, None, None]
    return mask_rule(kind, vis)(b, None, i[:, None], i)


@functools.cache
def compiled_flex_attention():  # only fast compiled; built on first use so import stays light
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, mask):
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D); mask: a BlockMask, a dense bool
    mask or None (every pair)."""
    if isinstance(mask, BlockMask):
        return compiled_flex_attention()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- batches

def collate(samples, cfg, tokenizer):
    """synth samples -> {group: dict of tensors} (see the module docstring); images must match
    cfg.image_size."""
    specials = ("[PAD]", "[BOS]", "[EOS]", "[BOI]", "[EOI]", "[SEP]")
    if [tokenizer.token_to_id(s) for s in specials] != list(range(6)):
        raise ValueError("tokenizer special ids differ from model.py's PAD..SEP = 0..5: "
                         "use synth.get_tokenizer")
    S = cfg.image_size
    layouts = {task: Layout(cfg, task) for task in ("vqa", "t2i", "edit")}

    def image_tensor(a):  # uint8 (S, S, 3) -> float (3, S, S) in [-1, 1]
        a = torch.as_tensor(np.asarray(a))
        if tuple(a.shape) != (S, S, 3):
            raise ValueError(f"image of shape {tuple(a.shape)} must be ({S}, {S}, 3) "
                             f"(UMMConfig.image_size={S})")
        return a.permute(2, 0, 1).float() / 127.5 - 1

    groups = {}
    for row, sample in enumerate(samples):
        task = TASK_GROUP[sample["task"]]
        L = layouts[task]
        ids = tokenizer.encode(sample["text"]).ids + ([SEP] if task == "vqa" else [])
        limit = getattr(cfg, f"{task}_text")
        if len(ids) > limit:
            raise ValueError(f"text of {len(ids)} tokens exceeds UMMConfig.{task}_text={limit}: "
                             f"raise {task}_text")
        tokens = torch.full((L.T,), PAD)  # (T,)
        tokens[0] = BOS
        tokens[L.code_boi], tokens[L.code_sep], tokens[L.code_eoi] = BOI, SEP, EOI  # dual_tokens
        tokens[L.text.stop - len(ids):L.text.stop] = torch.tensor(ids, dtype=torch.long)  # left-pad
        item = {"rows": torch.tensor(row), "tokens": tokens}
        if task == "vqa":
            item["sem"] = image_tensor(sample["image"])
            if sample.get("answer") is not None:  # absent at inference
                answer = tokenizer.encode(sample["answer"]).ids + [EOS]
                if len(answer) > cfg.answer_len:
                    raise ValueError(f"answer of {len(answer)} tokens + EOS exceeds "
                                     f"UMMConfig.answer_len={cfg.answer_len}")
                end = L.answer.start + len(answer)
                tokens[L.answer.start:end] = torch.tensor(answer, dtype=torch.long)
        else:
            tokens[L.boi] = BOI
            tokens[L.eoi] = EOI
            if task == "edit":
                item["source"] = image_tensor(sample["image"])
            if sample.get("target") is not None:
                item["target"] = image_tensor(sample["target"])
        # the attribute labels of each image the model reads or makes, when the sample has its
        # scene (every synth sample; not a prompt typed into sample.py)
        for image, scene in (("sem", "scene"), ("source", "scene"), ("target", "target_scene")):
            if image in item and sample.get(scene) is not None:
                item[f"{image}_cells"] = cell_labels(sample[scene], cfg)
        groups.setdefault(task, []).append(item)
    return {task: {k: torch.stack([it[k] for it in items]) for k in items[0]
                   if all(k in it for it in items)}  # labels only if every sample has them
            for task, items in groups.items()}


def cell_labels(scene, cfg):
    """A synth scene ([shape, color, size, row, col] per object) -> (N, 3) long: for each patch, in
    reading order, the classes (CELL_VALUES) of its cell's shape, colour and size; 0 is empty."""
    cells = torch.zeros(cfg.cells, cfg.cells, 3, dtype=torch.long)
    for *attrs, row, col in scene:
        cells[row, col] = torch.tensor([v.index(a) for v, a in zip(CELL_VALUES, attrs)])
    k = cfg.image_size // cfg.patch // cfg.cells  # patches per cell side
    return cells.repeat_interleave(k, 0).repeat_interleave(k, 1).flatten(0, 1)


def patchify(img, p):  # (B, 3, S, S) -> (B, N, 3 p p), patches in reading order
    B, C, S, _ = img.shape
    x = img.reshape(B, C, S // p, p, S // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, S/p, S/p, 3, p, p)
    return x.reshape(B, (S // p) ** 2, C * p * p)


def unpatchify(x, p):  # (B, N, 3 p p) -> (B, 3, S, S)
    B, N, _ = x.shape
    g = math.isqrt(N)
    x = x.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, g, p, g, p)
    return x.reshape(B, 3, g * p, g * p)


# ----------------------------------------------------------------------------- the blocks' math
# Statistics and products in fp32, results in the input's dtype. kernels.py has fused Triton
# versions of these four functions, with the same names; tests/test_kernels.py checks them
# against these.

def rmsnorm(x, weight, eps=1e-6):  # x (..., C), weight (C,)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rmsnorm_modulate(x, scale, shift, eps=1e-6):  # adaLN, no gain: x (B, T, C), scale, shift (B, C)
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xhat * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def rope_angles(coords, D, base):
    """(T, 2) row and column coordinates -> (T, D/2) angles of RoPE's D/2 frequency pairs: pair i
    turns at base^(-2i/D) per step of the row (i even) or of the column (i odd)."""
    inv_freq = base ** (-torch.arange(0, D, 2).float() / D)  # (D/2,), 1 first
    return coords[:, torch.arange(D // 2) % 2].float() * inv_freq


def rope(x, cos, sin):  # x (B, H, T, D), cos and sin (T, D/2): rotate the halves of each head
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def swiglu(gate, up):  # elementwise silu(gate) * up
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# ----------------------------------------------------------------------------- blocks
# Each op below runs kernels.py's Triton version when the config asks for kernels and Triton can
# run on the tensor (kernels.can_run), else the torch version above.

class RMSNorm(nn.Module):
    def __init__(self, dim, fused=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = fused

    def forward(self, x):
        if self.fused and kernels.can_run("rmsnorm", x):
            return kernels.rmsnorm(x, self.weight)
        return rmsnorm(x, self.weight)


class Expert(nn.Module):
    """The weights one kind of token passes through in a block: the two pre-norms (unless an adaLN
    block modulates its norms instead), the attention projections and the SwiGLU MLP."""

    def __init__(self, cfg, norms=True):
        super().__init__()
        C = cfg.width
        self.fused = cfg.kernels
        pre_norms = [RMSNorm(C, cfg.kernels), RMSNorm(C, cfg.kernels)] if norms else []
        self.norms = nn.ModuleList(pre_norms)  # before attention, before the MLP
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.fc = nn.Linear(C, 2 * cfg.hidden, bias=False)  # SwiGLU's gate and up in one matmul
        self.out = nn.Linear(cfg.hidden, C, bias=False)

    def mlp(self, h):  # (B, T, C) -> (B, T, C)
        gate, up = self.fc(h).chunk(2, -1)  # 2 x (B, T, hidden)
        if self.fused and kernels.can_run("swiglu", gate):
            return self.out(kernels.swiglu(gate, up))
        return self.out(swiglu(gate, up))

    # the three steps of a pre-norm block that use an expert's weights (see Block.forward)
    def project_qkv(self, x):  # (B, T, C) -> (B, T, 3C)
        return self.qkv(self.norms[0](x))

    def project_out(self, y):  # attention output (B, T, C) -> (B, T, C)
        return self.proj(y)

    def feed_forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.mlp(self.norms[1](x))


def split_heads(qkv, heads):  # (B, T, 3C) -> q, k, v, each (B, H, T, C/H)
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4)


def merge_heads(y):  # (B, H, T, D) -> (B, T, H D)
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP: the blocks of the trunk, the encoder and the refiner.
    Under MoT (BAGEL) the noisy image tokens, a contiguous slice `gen`, have their own expert."""

    def __init__(self, cfg, mot=False):
        super().__init__()
        self.heads = cfg.heads
        self.fused = cfg.kernels
        self.und = Expert(cfg)  # every token's weights; under MoT all but the noisy image's
        self.gen = Expert(cfg) if mot else None

    def forward(self, x, mask=None, cos=None, sin=None, gen=None, cache=None):  # x (B, T, C)
        qkv = self.routed(Expert.project_qkv, x, gen)  # (B, T, 3C)
        q, k, v = split_heads(qkv, self.heads)  # 3 x (B, H, T, D)
        if cos is not None:
            q, k = self.rotate(q, k, cos, sin)
        if cache is not None:
            k, v = extend_cache(cache, k, v)  # (B, H, Tk, D)
        y = merge_heads(attend(q, k, v, mask))  # (B, T, C)
        x = x + self.routed(Expert.project_out, y, gen)
        return x + self.routed(Expert.feed_forward, x, gen)

    def routed(self, step, x, gen):
        """step(expert, x) with each token's expert: MoT's slice gen uses the generation expert."""
        if self.gen is None or gen is None:
            return step(self.und, x)
        a, b = gen.start, gen.stop
        return torch.cat([step(self.und, x[:, :a]), step(self.gen, x[:, a:b]),
                          step(self.und, x[:, b:])], 1)

    def rotate(self, q, k, cos, sin):  # RoPE on queries and keys, in one call
        qk = torch.cat([q, k], 1)  # (B, 2H, T, D)
        if self.fused and kernels.can_run("rope", qk):
            return kernels.rope(qk, cos, sin).chunk(2, 1)
        return rope(qk, cos, sin).chunk(2, 1)


def extend_cache(cache, k, v):
    """Decoding: keys and values of the earlier positions come from the cache (a list, empty at
    the first call), and the cache keeps all of them for the next call."""
    if cache:
        k = torch.cat([cache[0], k], 2)
        v = torch.cat([cache[1], v], 2)
    cache[:] = [k, v]
    return k, v


class AdaLNBlock(nn.Module):
    """The flow head's block (DiT's adaLN-Zero): the condition c sets each branch's norm scale and
    shift and gates the branch; `ada` starts at zero, so the block starts as the identity."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.fused = cfg.kernels
        self.und = Expert(cfg, norms=False)  # named as in Block: checkpoint keys stay the same
        self.ada = nn.Linear(cfg.width, 6 * cfg.width, bias=False)

    def forward(self, x, c):  # x (B, N, C), c (B, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, -1)  # 6 x (B, C)
        q, k, v = split_heads(self.und.qkv(self.modulate(x, scale1, shift1)), self.heads)
        x = x + gate1[:, None] * self.und.proj(merge_heads(attend(q, k, v, None)))
        return x + gate2[:, None] * self.und.mlp(self.modulate(x, scale2, shift2))

    def modulate(self, x, scale, shift):
        if self.fused and kernels.can_run("rmsnorm_modulate", x):
            return kernels.rmsnorm_modulate(x, scale, shift)
        return rmsnorm_modulate(x, scale, shift)


def grid(table):  # (2, g, C) row and column embeddings -> (g g, C) 2-D embedding, reading order
    return (table[0][:, None] + table[1][None]).flatten(0, 1)


# ----------------------------------------------------------------------------- flow matching

def timestep_features(t, dim):  # t (B,) in [0, 1] -> (B, dim) sinusoids, as DiT
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], -1)


def shift_time(t, s):  # s > 1 spends more steps near t = 1 (noise), where larger images need them
    return s * t / (1 + (s - 1) * t)


def euler(velocity, x, steps, shift=1.0):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) down to t = 0 (data)."""
    ts = shift_time(torch.linspace(1, 0, steps + 1), shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t).item() * velocity(x, t.item())
    return x


# ----------------------------------------------------------------------------- the UMM

def matmul_weights(*modules):  # the weights of every nn.Linear in the modules, for FLOP counts
    return sum(m.weight.numel() for mod in modules for m in mod.modules()
               if isinstance(m, nn.Linear))


class UMM(nn.Module):
    """The unified model, in the order below: embedding (text, semantic and pixel image tokens),
    the trunk, the heads (text logits; the flow head's velocity), the training loss, sampling
    (Euler with guidance; KV-cache decoding), and the FLOP accounting for MFU."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("UMMConfig.vocab_size is 0: set it to tokenizer.get_vocab_size()")
        self.cfg = cfg
        C = cfg.width
        g = cfg.image_size // cfg.patch  # patches per side
        pd = 3 * cfg.patch ** 2  # values per patch
        self.n = g * g  # tokens per image
        self.layouts = {task: Layout(cfg, task) for task in ("vqa", "t2i", "edit")}
        # Per task, on the model's device: the kind of each position (a mask build copies nothing)
        # and RoPE's tables, with room for decoding past the layout (text: one step per token).
        D = C // cfg.heads
        for task, L in self.layouts.items():
            self.register_buffer(f"kind_{task}", L.kind, persistent=False)
            decode = torch.arange(L.T, L.T + 64)[:, None].expand(64, 2)
            angles = rope_angles(torch.cat([L.coords, decode]), D, cfg.rope_base)  # (T + 64, D/2)
            self.register_buffer(f"cos_{task}", angles.cos(), persistent=False)
            self.register_buffer(f"sin_{task}", angles.sin(), persistent=False)
        # semantic path: ViT encoder over clean patches, then the adapter into the trunk
        self.enc_in = nn.Linear(pd, C, bias=False)
        self.enc_pos = nn.Parameter(torch.randn(2, g, C) * cfg.pos_std)  # row, column embeddings
        self.encoder = nn.ModuleList([Block(cfg) for _ in range(cfg.enc_depth)])
        self.enc_norm = RMSNorm(C, cfg.kernels)
        self.adapter = nn.Sequential(nn.Linear(C, C, bias=False), nn.GELU(),
                                     nn.Linear(C, C, bias=False))
        self.sem_pos = nn.Parameter(torch.randn(2, g, C) * cfg.pos_std)  # the cell again
        if cfg.dual_tokens:  # the discrete half: a patch's nearest codebook entry, embedded
            self.register_buffer("codebook", torch.zeros(cfg.codebook, pd))  # fit_codebook fills it
            self.code_emb = nn.Embedding(cfg.codebook, C)
        # pixel path
        self.pix_in = nn.Linear(pd, C, bias=False)
        self.pix_pos = nn.Parameter(torch.randn(2, g, C) * cfg.pos_std)
        self.noisy_pos = (nn.Parameter(torch.randn(2, g, C) * cfg.noisy_pos) if cfg.noisy_pos
                          else None)  # the noisy image's tokens' own cells (see UMMConfig)
        # the edit source at each noisy token's own patch (see embed)
        self.src_pix = nn.Linear(pd, C, bias=False)
        self.src_sem = nn.Linear(C, C, bias=False)
        self.t_mlp = nn.Sequential(nn.Linear(C, C, bias=False), nn.SiLU(),
                                   nn.Linear(C, C, bias=False))
        # trunk and text head
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.blocks = nn.ModuleList([Block(cfg, mot=cfg.mot) for _ in range(cfg.depth)])
        self.norm = RMSNorm(C, cfg.kernels)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        # per-cell attribute heads (training only): semantic tokens, trunk outputs at noisy tokens
        self.sem_cells = nn.Linear(C, sum(CELL_CLASSES), bias=False)
        self.gen_cells = nn.Sequential(RMSNorm(C, cfg.kernels),
                                       nn.Linear(C, sum(CELL_CLASSES), bias=False))
        if cfg.layout_weight > 0:  # (only then: checkpoints without it still load)
            self.layout = nn.Sequential(RMSNorm(C, cfg.kernels),  # one vector -> each patch's cell
                                        nn.Linear(C, self.n * sum(CELL_CLASSES), bias=False))
        # flow head, with the optional refiner whose CLS output conditions it
        self.refiner = nn.ModuleList([Block(cfg) for _ in range(cfg.refiner_layers)])
        self.cls = nn.Parameter(torch.randn(C) * 0.02) if cfg.refiner_layers else None
        self.head = nn.ModuleList([AdaLNBlock(cfg) for _ in range(cfg.head_depth)])
        self.head_norm = RMSNorm(C, cfg.kernels)
        self.to_pixels = nn.Linear(C, pd, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for m in [b.ada for b in self.head] + [self.to_pixels]:  # flow head starts at v = 0, as DiT
            nn.init.zeros_(m.weight)

    # --- embedding
    def check_image(self, x):
        S = self.cfg.image_size
        if x.shape[1:] != (3, S, S):
            raise ValueError(f"image batch {tuple(x.shape)} must be (B, 3, {S}, {S}) "
                             f"(UMMConfig.image_size={S})")
        return x

    def semantic_tokens(self, image):  # (B, 3, S, S) in [-1, 1] -> (B, N, C)
        patches = patchify(self.check_image(image), self.cfg.patch)
        x = self.enc_in(patches) + grid(self.enc_pos)  # (B, N, C)
        for blk in self.encoder:
            x = blk(x)  # no mask: bidirectional
        # The trunk places tokens by RoPE in reading order; each semantic token also carries its
        # row and column, so "directly left of" or "row 2" need not be decoded from that order.
        return self.adapter(self.enc_norm(x)) + grid(self.sem_pos)

    @torch.no_grad()
    def fit_codebook(self, images, iters=20):
        """Fit the discrete tokenizer of dual_tokens to images (M, 3, S, S) in [-1, 1]: k-means
        over their patches, started from `codebook` distinct patches picked farthest-first, then
        Lloyd's iterations on the distinct patches weighted by their counts. Deterministic; a set
        of at most `codebook` distinct patches gets each its own code, so they round-trip exactly
        (the tiny world's training renders have 71: 70 objects, held-out combos aside, and empty).
        Returns the mean squared error per value of the coded patches."""
        patches = patchify(self.check_image(images), self.cfg.patch).flatten(0, 1).float()
        uniq, counts = torch.unique(patches, dim=0, return_counts=True)  # (U, pd), (U,)
        K = self.cfg.codebook
        picked = [0]
        dist = (uniq - uniq[0]).pow(2).sum(1)  # each distinct patch's distance to its nearest pick
        while len(picked) < K and dist.max() > 0:  # farthest first, until every patch is a code
            i = int(dist.argmax())
            picked.append(i)
            dist = torch.minimum(dist, (uniq - uniq[i]).pow(2).sum(1))
        # codes left over sit outside the pixel range [-1, 1], where no patch is nearest to them
        codes = torch.full((K, uniq.shape[1]), 4.0)
        codes[:len(picked)] = uniq[picked]  # (K, pd)
        for _ in range(iters):
            assign = torch.cdist(uniq, codes).argmin(1)  # (U,)
            w = F.one_hot(assign, K).float() * counts[:, None]  # (U, K)
            mass = w.sum(0)  # (K,)
            used = mass > 0  # an empty cluster keeps its entry
            codes[used] = (w.T @ uniq)[used] / mass[used, None]
        self.codebook.copy_(codes)
        coded = codes[torch.cdist(uniq, codes).argmin(1)]
        return float(((coded - uniq).pow(2).mean(1) * counts).sum() / counts.sum())

    def encode_codes(self, image):  # (B, 3, S, S) -> (B, N) long: each patch's nearest code
        patches = patchify(self.check_image(image), self.cfg.patch)  # (B, N, pd)
        return torch.cdist(patches.float(), self.codebook[None]).argmin(-1)

    def decode_codes(self, codes):  # (B, N) long -> (B, 3, S, S): the codes' patches
        return unpatchify(self.codebook[codes], self.cfg.patch)

    def pixel_tokens(self, patches):  # (B, N, 3 p p) -> (B, N, C)
        return self.pix_in(patches) + grid(self.pix_pos)

    def code_tokens(self, image):  # (B, 3, S, S) -> (B, N, C): the discrete half of dual_tokens
        return self.code_emb(self.encode_codes(image)) + grid(self.sem_pos)  # its cell, as sem's

    def embed(self, task, tokens, sem=None, source=None, x_t=None, temb=None, keep_sem=None,
              keep_pix=None):
        """Input vectors (B, T, C) and key visibility (B, T) of one task's sequences."""
        L = self.layouts[task]
        if tokens.shape[1] != L.T:
            raise ValueError(f"{task} tokens have length {tokens.shape[1]}, the layout needs "
                             f"{L.T}: use collate()")
        x = self.tok_emb(tokens)  # (B, T, C)
        vis = tokens != PAD  # (B, T): pads and dropped text are invisible
        if task == "vqa":
            x[:, L.sem] = self.semantic_tokens(sem)
            vis[:, L.sem] = True
            if self.cfg.dual_tokens:
                x[:, L.codes] = self.code_tokens(sem)
                vis[:, L.codes] = True
        if task != "vqa":
            x[:, L.noisy] = self.pixel_tokens(x_t) + temb[:, None]
            if self.noisy_pos is not None:
                x[:, L.noisy] += grid(self.noisy_pos)
            vis[:, L.noisy] = True
        if task == "t2i" and self.cfg.canvas:  # an empty image is black: -1 in every value
            blank = torch.full_like(x_t, -1.0)
            x[:, L.clean] = self.pixel_tokens(blank)
            vis[:, L.clean] = True
            x[:, L.noisy] += self.src_pix(blank)
        if task == "edit":
            sem = self.semantic_tokens(source)
            src = patchify(self.check_image(source), self.cfg.patch)
            x[:, L.sem] = sem
            vis[:, L.sem] = keep_sem[:, None]
            if self.cfg.dual_tokens:  # the codes are the same condition: dropped with it
                x[:, L.codes] = self.code_tokens(source)
                vis[:, L.codes] = keep_sem[:, None]
            x[:, L.clean] = self.pixel_tokens(src)
            vis[:, L.clean] = keep_pix[:, None]
            # Each noisy token also gets the kept source tokens of its own patch, as InstructPix2Pix
            # stacks the source onto the noisy input: keeping what should stay is then local.
            # Through attention alone the tiny model had not learned to copy after 3,600
            # pretraining steps (its x0 error at t = 0.9 was the same with and without the
            # source), so every edit redrew the scene from the text.
            x[:, L.noisy] += (keep_sem[:, None, None] * self.src_sem(sem)
                              + keep_pix[:, None, None] * self.src_pix(src))
        return x, vis

    # --- trunk
    def mask(self, task, vis):
        return attention_mask(getattr(self, f"kind_{task}"), vis, self.cfg.flex and vis.is_cuda)

    def trunk(self, x, task, mask, pos0=0, gen=None, caches=None):
        """x (B, T, C) at positions pos0.. of a task's layout -> (B, T, C); gen: MoT's slice;
        caches: one per block."""
        cos = getattr(self, f"cos_{task}")[pos0:pos0 + x.shape[1]]  # (T, D/2)
        sin = getattr(self, f"sin_{task}")[pos0:pos0 + x.shape[1]]
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, cos, sin, gen, caches[i] if caches is not None else None)
        return x

    # --- heads
    def text_logits(self, h):  # trunk outputs (B, ..., C) -> next-token logits (B, ..., V)
        return self.lm_head(self.norm(h))

    def velocity_patches(self, task, sub, x_t, t, keep_txt, keep_sem, keep_pix):
        """Velocity (B, N, 3 p p) of noisy patches x_t (B, N, 3 p p) at times t (B,), each sample
        under its own kept conditions (B,) bool: text, semantic source, pixel source; with the
        trunk's input and output (B, T, C), which the per-cell attribute losses read."""
        L = self.layouts[task]
        tokens = sub["tokens"].clone()
        tokens[:, L.text] = torch.where(keep_txt[:, None], tokens[:, L.text], PAD)  # dropped: [PAD]
        temb = self.t_mlp(timestep_features(t, self.cfg.width))  # (B, C)
        x, vis = self.embed(task, tokens, sub.get("sem"), sub.get("source"), x_t, temb, keep_sem,
                            keep_pix)
        h = self.trunk(x, task, self.mask(task, vis), gen=L.noisy)  # (B, T, C)
        if self.cls is not None:  # the refiner reads the condition prefix, bidirectionally
            P = L.noisy.start
            r = torch.cat([h[:, :P], self.cls.expand(h.shape[0], 1, -1)], 1)  # (B, P + 1, C)
            visible = F.pad(vis[:, :P], (0, 1), value=True)[:, None, None]  # (B, 1, 1, P + 1)
            for blk in self.refiner:
                r = blk(r, visible)
            temb = temb + r[:, -1]  # its CLS output joins the timestep embedding
        y = h[:, L.noisy]  # (B, N, C)
        for blk in self.head:
            y = blk(y, temb)
        # The head predicts the clean patches, and the velocity follows from
        # x_t = (1 - t) x_0 + t eps as (x_t - x_0) / t (JiT's x-prediction): clean patches lie on a
        # low-dimensional manifold that a narrow model can reach, 192-dim noise does not, and
        # v-prediction left visible noise in every sample.
        x0 = self.to_pixels(self.head_norm(y))  # (B, N, 3 p p)
        if task == "edit" and self.cfg.src_residual:
            x0 = x0 + keep_pix[:, None, None] * patchify(sub["source"], self.cfg.patch)
        return (x_t - x0) / t.clamp(min=0.05)[:, None, None], x, h

    # --- training loss
    def draw_noise(self, batch):
        """The flow loss's randomness, {generation task: (t (B,), eps (B, N, 3 p p), u (3, B))}:
        logit-normal times (t = 1 for a t_noise share), Gaussian noise, and uniforms for the three
        condition dropouts. Training draws it outside the compiled loss: inside its graph a compiler
        may reorder the draws (Inductor did, in torch 2.11), and from outside the same seed gives
        the same noise whether the loss is compiled or not."""
        noise = {}
        for task in ("t2i", "edit"):
            if task in batch:
                target = batch[task]["target"]
                B = target.shape[0]
                t = torch.sigmoid(torch.randn(B, device=target.device) + self.cfg.t_mean)
                eps = torch.randn(B, self.n, 3 * self.cfg.patch ** 2, device=target.device)
                u = torch.rand(4, B, device=target.device)  # 3 condition dropouts, then t_noise
                t = torch.where(u[3] < self.cfg.t_noise, 1.0, t)
                noise[task] = (t, eps, u[:3])
        return noise

    def answer_loss(self, sub):
        """CE of the answer tokens of a 'vqa' sub-batch, teacher-forced; with the semantic tokens
        (B, N, C)."""
        L = self.layouts["vqa"]
        x, vis = self.embed("vqa", sub["tokens"], sem=sub["sem"])
        h = self.trunk(x, "vqa", self.mask("vqa", vis))  # (B, T, C)
        logits = self.text_logits(h[:, L.answer.start - 1:L.answer.stop - 1])  # (B, A, V)
        targets = sub["tokens"][:, L.answer]  # (B, A)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD)
        return ce, x[:, L.sem]

    def layout_cells(self, boi):  # trunk outputs at BOI (B, 1, C) -> (B, N, sum(CELL_CLASSES))
        return self.layout(boi).view(boi.shape[0], self.n, -1)

    def cell_loss(self, head, features, labels, weight):
        """CE over the three attributes of every cell, averaged with weights (B, N): head
        (C -> sum(CELL_CLASSES)) on features (B, N, C) against labels (B, N, 3)."""
        logits = head(features).float().split(CELL_CLASSES, -1)  # 3 x (B, N, classes)
        ce = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten(), reduction="none")
                 for i, lg in enumerate(logits)) / len(logits)  # (B N,)
        return (ce * weight.flatten()).sum() / weight.sum()

    def change_weights(self, target, source=None):
        """Per-token loss weights (B, N): change_weight where the target (B, N, ...), patches or
        cell labels, differs from the edit's source, 1 elsewhere and without a source."""
        if source is None:
            return target.new_ones(target.shape[:2], dtype=torch.float)
        changed = (target != source).flatten(2).any(-1)  # (B, N)
        return 1.0 + (self.cfg.change_weight - 1.0) * changed.float()

    def flow_errors(self, task, sub, noise):
        """Per-sample flow MSE (B,) of a 't2i' or 'edit' sub-batch; with the semantic source
        tokens (B, N, C) (edit), the trunk's outputs at the noisy tokens (B, N, C) and at the BOI
        before them (B, 1, C)."""
        L = self.layouts[task]
        x0 = patchify(self.check_image(sub["target"]), self.cfg.patch)  # (B, N, 3 p p)
        t, eps, u = noise
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps  # (B, N, 3 p p)
        rates = (self.cfg.txt_dropout, self.cfg.src_dropout, self.cfg.src_pixel_dropout)
        if self.training:  # (B,) kept conditions: text, semantic source, pixel source
            keep = [u[i] >= rate for i, rate in enumerate(rates)]
        else:  # all kept, but a source that training always drops stays dropped
            keep = [torch.full((x0.shape[0],), rate < 1, device=x0.device) for rate in rates]
        v, x, h = self.velocity_patches(task, sub, x_t, t, *keep)
        # The v-loss weighs the x_0 error by 1 / t^2: nearly clean samples dominate it, while the
        # text decides the image near t = 1. x_loss weighs every t alike.
        weight = t.clamp(min=0.05)[:, None, None] ** 2 if self.cfg.x_loss else 1.0
        err = (weight * (v.float() - (eps - x0)).pow(2)).mean(2)  # (B, N)
        source = patchify(sub["source"], self.cfg.patch) if task == "edit" else None
        w = self.change_weights(x0, source)  # (B, N)
        return (w * err).sum(1) / w.sum(1), x[:, L.sem], h[:, L.noisy], h[:, L.boi]

    def loss(self, batch, noise=None):
        """(total, parts): CE over vqa answer tokens, flow MSE over noisy tokens, and the per-cell
        attribute CEs 'sem_cells' (semantic tokens: vqa image, edit source) and 'gen_cells' (trunk
        outputs at noisy tokens: the target), and 'layout' (the trunk's output at the BOI before
        the noisy image: the target's cells from the conditions alone) when their weights are > 0
        and the batch has labels;
        parts are detached and hold a loss only when the batch has its task, plus 'flow_t<k>' =
        flow loss with t in [k/4, (k+1)/4) (NaN when no sample's t fell in that bin).
        noise: from draw_noise(batch), drawn here if not given."""
        cfg = self.cfg
        parts = {}
        total = 0.0
        noise = self.draw_noise(batch) if noise is None else noise
        sem, gen, layout = [], [], []  # (features, labels, weights) for the attribute heads
        if "vqa" in batch:
            sub = batch["vqa"]
            ce, sem_tokens = self.answer_loss(sub)
            total = total + cfg.ce_weight * ce
            parts["ce"] = ce.detach()
            if "sem_cells" in sub:
                sem.append((sem_tokens, sub["sem_cells"], self.change_weights(sub["sem_cells"])))
        tasks = [task for task in ("t2i", "edit") if task in batch]
        if tasks:
            errs = []
            for task in tasks:
                sub = batch[task]
                err, sem_tokens, noisy_out, boi_out = self.flow_errors(task, sub, noise[task])
                errs.append(err)
                if "source_cells" in sub:
                    sem.append((sem_tokens, sub["source_cells"],
                                self.change_weights(sub["source_cells"])))
                if "target_cells" in sub:  # an edit's changed cells weigh change_weight
                    w = self.change_weights(sub["target_cells"], sub.get("source_cells"))
                    gen.append((noisy_out, sub["target_cells"], w))
                    layout.append((boi_out, sub["target_cells"], w))
            err = torch.cat(errs)
            t = torch.cat([noise[task][0] for task in tasks])  # (B_gen,)
            flow = err.mean()
            total = total + cfg.flow_weight * flow
            parts["flow"] = flow.detach()
            # The mean of each t-bin without `if bin not empty` (a host sync and a graph break under
            # torch.compile): an empty bin divides 0 by 0, and the training log skips its NaN.
            bins = F.one_hot((t * 4).long().clamp(max=3), 4).to(err.dtype)  # (B_gen, 4)
            per_bin = (err.detach() @ bins) / bins.sum(0)  # (4,)
            for k in range(4):
                parts[f"flow_t{k}"] = per_bin[k]
        for name, weight, head, pairs in (("sem_cells", cfg.sem_cell_weight, self.sem_cells, sem),
                                          ("gen_cells", cfg.gen_cell_weight, self.gen_cells, gen),
                                          ("layout", cfg.layout_weight, self.layout_cells, layout)):
            if weight > 0 and pairs:
                cells = self.cell_loss(head, *(torch.cat(part) for part in zip(*pairs)))
                total = total + weight * cells
                parts[name] = cells.detach()
        return total, parts

    def forward(self, batch, noise=None):  # DDP and torch.compile wrap forward: the training loss
        return self.loss(batch, noise)

    # --- sampling
    def velocity(self, task, sub, x_t, t, with_text=True, with_image=True):
        """Velocity (B, 3, S, S) of noisy images x_t at t (float or (B,)), with or without the
        text and the source image. The clean pixel source counts as part of the image condition
        unless training always dropped it."""
        task = TASK_GROUP[task]
        B = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float, device=x_t.device).expand(B)  # (B,)
        with_pixels = with_image and self.cfg.src_pixel_dropout < 1
        keep = [torch.full((B,), bool(on), device=x_t.device)
                for on in (with_text, with_image, with_pixels)]
        patches = patchify(self.check_image(x_t), self.cfg.patch)
        v = self.velocity_patches(task, sub, patches, t, *keep)[0]
        return unpatchify(v, self.cfg.patch)

    def guided_velocity(self, task, sub, x_t, t, txt_scale=1.0, img_scale=1.0):
        """t2i: v_u + w (v_c - v_u), w = txt_scale. edit (Ovis-U1's dual guidance):
        v(0,0) + s_img [v(img,0) - v(0,0)] + s_txt [v(img,txt) - v(img,0)]."""
        v_00 = self.velocity(task, sub, x_t, t, with_text=False, with_image=False)
        if TASK_GROUP[task] == "t2i":
            v_t0 = self.velocity(task, sub, x_t, t, with_text=True, with_image=False)
            return v_00 + txt_scale * (v_t0 - v_00)
        v_0i = self.velocity(task, sub, x_t, t, with_text=False, with_image=True)
        v_ti = self.velocity(task, sub, x_t, t, with_text=True, with_image=True)
        return v_00 + img_scale * (v_0i - v_00) + txt_scale * (v_ti - v_0i)

    @torch.no_grad()
    def sample(self, task, sub, steps=20, shift=1.0, txt_scale=1.0, img_scale=1.0, generator=None):
        """Generate (t2i) or edit (edit) the images of a collated sub-batch: (B, 3, S, S) in
        [-1, 1]."""
        S = self.cfg.image_size
        B = sub["tokens"].shape[0]
        noise = torch.randn(B, 3, S, S, generator=generator).to(sub["tokens"].device)
        velocity = functools.partial(self.guided_velocity, task, sub, txt_scale=txt_scale,
                                     img_scale=img_scale)
        return euler(velocity, noise, steps, shift).clamp(-1, 1)

    @torch.no_grad()
    def generate_text(self, sub, max_new_tokens=None, temperature=0.0, use_cache=True,
                      generator=None):
        """Answer the questions of a collated 'vqa' sub-batch: (B, max_new_tokens) ids (read up to
        EOS). Greedy at temperature 0, else sampled; use_cache=False recomputes the whole prefix
        for every token."""
        L = self.layouts["vqa"]
        max_new = max_new_tokens or self.cfg.answer_len
        P = L.answer.start  # the prompt: BOS, semantic image, question and SEP
        if P + max_new > self.cos_vqa.shape[0]:
            raise ValueError(f"max_new_tokens={max_new} exceeds the {self.cos_vqa.shape[0] - P} "
                             f"positions RoPE has")
        x, vis = self.embed("vqa", sub["tokens"], sem=sub["sem"])
        x, vis = x[:, :P], vis[:, :P]  # (B, P, C), (B, P)
        kind = F.pad(self.kind_vqa, (0, max_new))  # (P + A + max_new,): answers are text
        caches = [[] for _ in self.blocks] if use_cache else None
        out = []
        new = x
        for i in range(max_new):
            if use_cache:  # prefill once, then one position at a time
                mask = attention_mask(kind[:P], vis, False) if i == 0 else vis[:, None, None, :]
                h = self.trunk(new, "vqa", mask, pos0=x.shape[1] - new.shape[1], caches=caches)
            else:
                h = self.trunk(x, "vqa", attention_mask(kind[:x.shape[1]], vis, False))  # (B, T, C)
            logits = self.text_logits(h[:, -1]).float()  # (B, V)
            if temperature > 0:
                probs = F.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            new = self.tok_emb(nxt)  # (B, 1, C)
            x = torch.cat([x, new], 1)
            vis = F.pad(vis, (0, 1), value=True)
        return torch.cat(out, 1)

    # --- accounting, for MFU
    def num_params(self):
        return {"total": sum(p.numel() for p in self.parameters()), "matmul": matmul_weights(self)}

    def tokens_per_sample(self, task):
        return self.layouts[TASK_GROUP[task]].T

    def flops_per_sample(self, task):
        """Training FLOPs (forward + backward) of one sample: 6 per matmul weight per token that
        passes through it, plus 12 x width per query-key pair per attention layer (dense, as
        nanoGPT counts)."""
        cfg = self.cfg
        L = self.layouts[TASK_GROUP[task]]
        weights = matmul_weights
        n_sem = L.sem.stop - L.sem.start
        n_gen = L.noisy.stop - L.noisy.start
        n_pix = L.clean.stop - L.clean.start + n_gen
        n_answer = L.answer.stop - L.answer.start
        P = (L.noisy.start + 1) * (n_gen > 0)  # refiner tokens: the condition prefix and CLS
        ada = sum(b.ada.weight.numel() for b in self.head)  # once per sample, like the t MLP
        trunk = weights(self.blocks) // (2 if cfg.mot else 1)  # each token uses one MoT expert
        weights_x_tokens = (trunk * L.T
                            + weights(self.enc_in, self.encoder, self.adapter) * n_sem
                            + weights(self.pix_in) * n_pix
                            + weights(self.src_sem) * (n_sem > 0) * n_gen
                            + weights(self.src_pix) * (n_pix > n_gen) * n_gen
                            + weights(self.lm_head) * n_answer
                            + weights(self.sem_cells) * n_sem * (cfg.sem_cell_weight > 0)
                            + weights(self.gen_cells) * n_gen * (cfg.gen_cell_weight > 0)
                            + (weights(self.layout) * (n_gen > 0) if cfg.layout_weight > 0 else 0)
                            + weights(self.refiner) * P
                            + (weights(self.head, self.to_pixels) - ada) * n_gen
                            + (ada + weights(self.t_mlp)) * (n_gen > 0))
        pairs = (cfg.depth * L.T ** 2 + cfg.enc_depth * n_sem ** 2 + cfg.head_depth * n_gen ** 2
                 + cfg.refiner_layers * P ** 2)
        return 6 * weights_x_tokens + 12 * cfg.width * pairs


# ----------------------------------------------------------------------------- checkpoints
# (written by train.py)
def checkpoints(run_dir):
    """The complete step_N folders of a run folder, oldest first: ordered by N, not by name (in
    which step_1000000 would come before step_999999)."""
    found = {}
    for folder in glob.glob(os.path.join(run_dir, "step_*")):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(folder))
        if m and os.path.isfile(os.path.join(folder, "config.json")):
            found[int(m[1])] = folder
    return [found[step] for step in sorted(found)]


def newest_checkpoint(path):
    """A checkpoint folder itself, or the newest complete step_* inside a run folder (or None)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    steps = checkpoints(path)
    return steps[-1] if steps else None


def read_weights(path, name, model):
    """The tensors of `name` (model.safetensors / ema.safetensors) of a checkpoint, checked to fit
    model."""
    file = os.path.join(path, name)
    try:
        state = load_file(file)
    except Exception as e:
        raise ValueError(f"checkpoint file {file} is missing or corrupt ({type(e).__name__}: {e})"
                         ) from None
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise ValueError(f"checkpoint file {file} lacks weight {k!r}: it was made by a "
                             f"different model config")
        if state[k].shape != v.shape:
            raise ValueError(f"checkpoint file {file}: {k} has shape {tuple(state[k].shape)}, this "
                             f"model needs {tuple(v.shape)} (different preset or width?)")
    extra = set(state) - set(own)
    if extra:
        raise ValueError(f"checkpoint file {file} has weights this model lacks "
                         f"({sorted(extra)[0]}, ...): check --mot/--refiner_layers")
    return state


def load_weights(path, name, model):
    """Load `name` of a checkpoint into model, checked by read_weights."""
    state = read_weights(path, name, model)
    model.load_state_dict(state)
    return state


def read_meta(path):
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {file} is missing or corrupt: {e}") from None


# What a checkpoint saved before a model key existed was trained with: the key's value then, not
# today's default (a missing rope_2d would silently turn its image tokens the new way).
LEGACY = {"rope_2d": False, "src_residual": False}


def load_checkpoint(path, weights="ema", device="cpu"):
    """(model in eval mode, tokenizer, meta) from a step_* checkpoint folder or a run folder (its
    newest)."""
    from tokenizers import Tokenizer
    ckpt = newest_checkpoint(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise ValueError(f"no checkpoint at {path}: pass a step_NNNNNN folder or a run folder "
                         f"that holds one")
    meta = read_meta(ckpt)
    try:
        tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    except Exception as e:
        raise ValueError(f"checkpoint file {ckpt}/tokenizer.json is missing or corrupt: {e}"
                         ) from None
    model = UMM(UMMConfig(**{**LEGACY, **meta["model"]}))
    load_weights(ckpt, f"{weights}.safetensors", model)
    return model.to(device).eval(), tok, meta


if __name__ == "__main__":  # the sizes and times in README's Model and Speed sections
    import synth

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    for name in PRESETS:
        tok = synth.get_tokenizer("tiny" if name == "tiny" else "default")
        m = UMM(UMMConfig.preset(name, vocab_size=tok.get_vocab_size()))
        n = m.num_params()
        gflops = " ".join(f"{t} {m.flops_per_sample(t) / 1e9:.2f}" for t in ("vqa", "t2i", "edit"))
        print(f"{name}: width {m.cfg.width} depth {m.cfg.depth} heads {m.cfg.heads}: "
              f"{n['total'] / 1e6:.2f} M params ({n['matmul'] / 1e6:.2f} M matmul); "
              f"T vqa/t2i/edit {[L.T for L in m.layouts.values()]}; GFLOPs/sample {gflops}")

    tok = synth.get_tokenizer("tiny")
    model = UMM(UMMConfig.preset("tiny", vocab_size=tok.get_vocab_size()))
    samples = [synth.make_sample("tiny", synth.TASKS[i % 4], "train", i) for i in range(32)]
    batch = collate(samples, model.cfg, tok)
    ms = 1e3 * kernels.median_seconds(lambda: model.loss(batch)[0].backward(), cpu, repeats=10)
    print(f"tiny forward+backward, 32 mixed samples: {ms:.0f} ms "
          f"(median of 10, {torch.get_num_threads()} threads)")
    model.eval()
    for B in (1, 32):
        questions = [synth.make_sample("tiny", "vqa", "val", i) for i in range(B)]
        vqa = collate(questions, model.cfg, tok)["vqa"]
        cached = 1e3 * kernels.median_seconds(lambda: model.generate_text(vqa, 6), cpu, repeats=10)
        uncached = 1e3 * kernels.median_seconds(
            lambda: model.generate_text(vqa, 6, use_cache=False), cpu, repeats=10)
        print(f"tiny decoding 6 tokens for {B} questions: {cached:.1f} ms with KV cache, "
              f"{uncached:.1f} ms without ({uncached / cached:.1f}x)")
