"""The nanoUMM model: one transformer trunk that answers questions about images (text, autoregressive)
and generates and edits images (flow matching in pixel space), after BAGEL, Transfusion and Ovis-U1.

Run: `python model.py` prints every preset's size and the tiny preset's step and decoding times (below).

Sequences (one per sample; fixed length per task and preset, text left-padded with [PAD] in its slot):
    vqa:   BOS [sem image] question SEP | answer EOS PAD..     CE on the answer slot
    t2i:   BOS caption BOI [noisy pixel image] EOI             flow loss on the noisy image
    edit:  BOS [sem source] instruction BOI [clean pixel source] [noisy pixel target] EOI   (edit and uniedit)
Semantic tokens come from a small bidirectional ViT over the clean image plus a 2-layer MLP adapter; pixel
tokens are linear patch embeddings plus a 2-D position embedding (noisy ones also get the timestep embedding).
Attention: causal, bidirectional within an image, and only an image's own tokens attend to a noisy image;
[PAD] and dropped conditions are invisible keys. Flow matching: x_t = (1 - t) x_0 + t eps, v = eps - x_0,
t = sigmoid(N(0, 1)) in training, MSE on v; the flow head predicts x_0 and v = (x_t - x_0) / t follows
(x-prediction, as JiT); Euler from t = 1 to 0 with the shift t' = s t / (1 + (s - 1) t).

Batch (from `collate`): a dict {task group: dict of tensors}; groups "vqa", "t2i", "edit" (edit and uniedit
share the edit layout), each present only if the samples hold that task, so any mix of tasks is one batch:
    tokens (B, T) long, text ids with BOS/BOI/EOI/SEP/EOS placed and [PAD] at image positions
    sem (B, 3, S, S) float in [-1, 1] (vqa), source and target (edit), target (t2i); rows (B,) = sample indices.

API: UMMConfig.preset(name, **overrides); UMM(cfg); collate(samples, cfg, tokenizer) -> batch;
model.loss(batch, noise=model.draw_noise(batch)) -> (total, parts); model.generate_text(batch["vqa"]) -> answer
ids; model.velocity(task, sub, x_t, t, txt, img); model.guided_velocity(...); model.sample(task, sub, steps, shift,
txt_scale, img_scale); euler(velocity_fn, x, steps, shift); model.num_params() -> {total, matmul};
model.flops_per_sample(task) = 6 x (matmul weights each token passes through) + 12 x width x (query, key) pairs
per attention layer, for MFU.

Measured with `python model.py` (2-core CPU, quiet, fp32, 2 threads; best of 10):
    tiny   width 128, depth 4, heads 2      2.10 M params (2.04 M matmul)    T vqa/t2i/edit 45/75/83
    small  width 384, depth 12, heads 6    31.5 M params                    T 93/123/227
    base   width 640, depth 20, heads 10  127.0 M params                    T 93/123/227
    tiny forward+backward of 32 mixed samples (8 of each synth task): 134 ms
    tiny decoding 6 tokens, KV cache vs none: 32.8 vs 118.7 ms for 32 questions (3.6x); 7.6 vs 12.0 ms for one
    (1.6x: at batch 1 the Python overhead of each step dominates, not the recomputed prefix)
"""
import functools
import glob
import json
import math
import os
import re
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import kernels

PAD, BOS, EOS, BOI, EOI, SEP = 0, 1, 2, 3, 4, 5  # ids of synth.SPECIALS
TASK_GROUP = {"vqa": "vqa", "t2i": "t2i", "edit": "edit", "uniedit": "edit"}


@dataclass
class UMMConfig:
    width: int = 128  # the size dial: depth = width // 32 and heads = width // 64 unless set
    depth: int = 0
    heads: int = 0
    image_size: int = 32  # px per side, that of the synth world
    patch: int = 8  # px per patch side; the world's cell size gives one token per cell
    enc_depth: int = 2  # semantic ViT encoder blocks
    head_depth: int = 2  # adaLN flow-head blocks
    vqa_text: int = 24  # fixed text slot of each layout, in tokens: synth's longest texts are a probe question
    t2i_text: int = 56  # + SEP (18), a 6-object test_ood caption (54) and an intelligent edit (28)
    edit_text: int = 32
    answer_len: int = 4  # the vqa answer slot (answer + EOS)
    vocab_size: int = 0  # tokenizer.get_vocab_size()
    mot: bool = False  # BAGEL's mixture-of-transformers: own trunk weights for the noisy image tokens
    refiner_layers: int = 0  # Ovis-U1's bidirectional refiner; its CLS output joins the timestep embedding
    flex: bool = True  # FlexAttention block masks on CUDA (dense-mask SDPA on CPU)
    kernels: bool = False  # the fused Triton ops of kernels.py (CUDA or TRITON_INTERPRET=1), else torch references
    rope_base: float = 10000.0
    ce_weight: float = 1.0  # total = ce_weight * ce + flow_weight * flow; ce_weight=0 is flow-only
    flow_weight: float = 1.0
    txt_dropout: float = 0.1  # training drops each condition independently so guidance has all its terms
    src_dropout: float = 0.1  # the semantic source tokens
    src_pixel_dropout: float = 0.1  # the clean pixel source tokens (1.0 in the Uni-Edit recipe)

    def __post_init__(self):
        self.depth = self.depth or self.width // 32
        self.heads = self.heads or max(1, self.width // 64)
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width={self.width} must split into heads={self.heads} of even size (for RoPE)")
        if self.image_size % self.patch:
            raise ValueError(f"patch={self.patch} must divide image_size={self.image_size}")

    @staticmethod
    def preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def hidden(self):  # SwiGLU width: 8/3 of the model width (same FLOPs as a 4x GELU MLP), rounded to 32
        return (8 * self.width // 3 + 31) // 32 * 32


PRESETS = {
    "tiny": UMMConfig(width=128, image_size=32, patch=8),  # CPU, the 32x32 tiny world
    "small": UMMConfig(width=384, image_size=64, patch=8),  # one GPU, the 64x64 default world
    "base": UMMConfig(width=640, image_size=64, patch=8),  # a few GPUs
}


# --- layouts and the attention rule ---
class Layout:
    """Where each segment of a task's sequence sits; img marks image tokens (1 sem, 2 clean, 3 noisy)."""

    def __init__(self, cfg, task):
        n, L = (cfg.image_size // cfg.patch) ** 2, getattr(cfg, f"{task}_text")
        seg = {"vqa": [("bos", 1), ("sem", n), ("text", L), ("answer", cfg.answer_len)],
               "t2i": [("bos", 1), ("text", L), ("boi", 1), ("noisy", n), ("eoi", 1)],
               "edit": [("bos", 1), ("sem", n), ("text", L), ("boi", 1), ("clean", n), ("noisy", n), ("eoi", 1)]}[task]
        pos = np.cumsum([0] + [k for _, k in seg])
        self.task, self.T = task, int(pos[-1])
        for name in ("sem", "text", "answer", "clean", "noisy"):  # a missing segment is the empty slice
            setattr(self, name, slice(self.T, self.T))
        for (name, _), a, b in zip(seg, pos[:-1], pos[1:]):
            setattr(self, name, slice(int(a), int(b)))
        self.img = torch.zeros(self.T, dtype=torch.long)  # (T,)
        for i, name in enumerate(("sem", "clean", "noisy")):
            self.img[getattr(self, name)] = i + 1


def mask_rule(img, vis):
    """The attention rule as a FlexAttention mask_mod; broadcast over index tensors it also builds the dense mask."""

    def rule(b, h, q, kv):
        earlier = (kv <= q) & (img[kv] != 3)  # causal, except that a noisy image (3) is hidden from the rest
        same_image = (img[q] == img[kv]) & (img[kv] > 0)  # bidirectional within an image
        return vis[b, kv] & (earlier | same_image)

    return rule


def attention_mask(img, vis, flex):  # img (T,), vis (B, T) -> BlockMask, or dense bool (B, 1, T, T)
    B, T = vis.shape
    if flex:
        return create_block_mask(mask_rule(img, vis), B, None, T, T, device=vis.device)
    i = torch.arange(T, device=vis.device)
    return mask_rule(img, vis)(torch.arange(B, device=vis.device)[:, None, None, None], None, i[:, None], i)


@functools.cache
def compiled_flex_attention():  # FlexAttention is only fast compiled; built on first use so import stays light
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, mask):  # q (B, H, Tq, D), k/v (B, H, Tk, D); mask: BlockMask, dense bool or None (all pairs)
    if isinstance(mask, BlockMask):
        return compiled_flex_attention()(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# --- modules ---
def patchify(img, p):  # (B, 3, S, S) -> (B, N, 3 p p), patches in reading order
    B, C, S, _ = img.shape
    x = img.reshape(B, C, S // p, p, S // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, S/p, S/p, 3, p, p)
    return x.reshape(B, (S // p) ** 2, C * p * p)


def unpatchify(x, p):  # (B, N, 3 p p) -> (B, 3, S, S)
    B, N, _ = x.shape
    g = math.isqrt(N)
    x = x.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, g, p, g, p)
    return x.reshape(B, 3, g * p, g * p)


class RMSNorm(nn.Module):
    def __init__(self, dim, fused=False):
        super().__init__()
        self.weight, self.fused = nn.Parameter(torch.ones(dim)), fused

    def forward(self, x):
        return kernels.rmsnorm(x, self.weight, use_triton=self.fused)


class Expert(nn.Module):
    """The weights one kind of token uses in a block (MoT gives the noisy image tokens their own)."""

    def __init__(self, cfg, norms=True):
        super().__init__()
        C, self.fused = cfg.width, cfg.kernels
        self.norms = nn.ModuleList([RMSNorm(C, cfg.kernels), RMSNorm(C, cfg.kernels)] if norms else [])
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.fc, self.out = nn.Linear(C, 2 * cfg.hidden, bias=False), nn.Linear(cfg.hidden, C, bias=False)

    def mlp(self, h):
        gate, up = self.fc(h).chunk(2, -1)  # 2 x (B, T, hidden)
        return self.out(kernels.swiglu(gate, up, use_triton=self.fused))


class Block(nn.Module):
    """Pre-norm attention + SwiGLU block. With adaln (the flow head) the norms are modulated by a condition c
    and the branches gated, zero-initialised (DiT's adaLN-Zero); with mot a slice of tokens has its own expert."""

    def __init__(self, cfg, mot=False, adaln=False):
        super().__init__()
        self.heads, self.fused = cfg.heads, cfg.kernels
        self.und = Expert(cfg, norms=not adaln)
        self.gen = Expert(cfg) if mot else None
        self.ada = nn.Linear(cfg.width, 6 * cfg.width, bias=False) if adaln else None

    def forward(self, x, mask=None, cos=None, sin=None, gen=None, cache=None, c=None):  # x (B, T, C)
        B, T, C = x.shape
        mods = self.ada(c).chunk(6, -1) if c is not None else None  # 6 x (B, C): shift, scale, gate per branch

        def each(fn, h):  # apply fn with each token's expert; the generation tokens are a contiguous slice
            if self.gen is None or gen is None:
                return fn(self.und, h)
            a, b = gen.start, gen.stop
            return torch.cat([fn(self.und, h[:, :a]), fn(self.gen, h[:, a:b]), fn(self.und, h[:, b:])], 1)

        def norm(e, h, i):  # pre-norm of branch i
            return e.norms[i](h) if mods is None else kernels.rmsnorm_modulate(
                h, mods[3 * i + 1], mods[3 * i], use_triton=self.fused)

        def gate(h, i):
            return h if mods is None else mods[3 * i + 2][:, None] * h

        qkv = each(lambda e, h: e.qkv(norm(e, h, 0)), x)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if cos is not None:
            qk = kernels.rope(torch.cat([q, k], 1), cos, sin, use_triton=self.fused)  # one call rotates q and k
            q, k = qk.chunk(2, 1)
        if cache is not None:  # decoding: keys and values of earlier positions come from the cache
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (B, H, Tk, D)
            cache[:] = [k, v]
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + gate(each(lambda e, h: e.proj(h), y), 0)
        return x + gate(each(lambda e, h: e.mlp(norm(e, h, 1)), x), 1)


def grid(table):  # (2, g, C) row and column embeddings -> (g g, C) 2-D position embedding, reading order
    return (table[0][:, None] + table[1][None]).flatten(0, 1)


def timestep_features(t, dim):  # t (B,) in [0, 1] -> (B, dim) sinusoids, as DiT
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], -1)


class UMM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("UMMConfig.vocab_size is 0: set it to tokenizer.get_vocab_size()")
        self.cfg, C, p = cfg, cfg.width, cfg.patch
        self.n = (cfg.image_size // p) ** 2  # tokens per image
        self.layouts = {task: Layout(cfg, task) for task in ("vqa", "t2i", "edit")}
        for task, L in self.layouts.items():  # on the model's device: building a mask copies nothing to it
            self.register_buffer(f"img_{task}", L.img, persistent=False)
        g, pd = cfg.image_size // p, 3 * p * p
        # semantic path: ViT encoder over clean patches, then the adapter into the trunk
        self.enc_in = nn.Linear(pd, C, bias=False)
        self.enc_pos = nn.Parameter(torch.randn(2, g, C) * 0.02)  # row and column embeddings
        self.encoder = nn.ModuleList([Block(cfg) for _ in range(cfg.enc_depth)])
        self.enc_norm = RMSNorm(C, cfg.kernels)
        self.adapter = nn.Sequential(nn.Linear(C, C, bias=False), nn.GELU(), nn.Linear(C, C, bias=False))
        # pixel path
        self.pix_in = nn.Linear(pd, C, bias=False)
        self.pix_pos = nn.Parameter(torch.randn(2, g, C) * 0.02)
        # the edit source at each noisy token's own patch (see embed)
        self.src_pix = nn.Linear(pd, C, bias=False)
        self.src_sem = nn.Linear(C, C, bias=False)
        self.t_mlp = nn.Sequential(nn.Linear(C, C, bias=False), nn.SiLU(), nn.Linear(C, C, bias=False))
        # trunk
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.blocks = nn.ModuleList([Block(cfg, mot=cfg.mot) for _ in range(cfg.depth)])
        self.norm = RMSNorm(C, cfg.kernels)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        # flow head (with the optional refiner whose CLS output conditions it)
        self.refiner = nn.ModuleList([Block(cfg) for _ in range(cfg.refiner_layers)])
        self.cls = nn.Parameter(torch.randn(C) * 0.02) if cfg.refiner_layers else None
        self.head = nn.ModuleList([Block(cfg, adaln=True) for _ in range(cfg.head_depth)])
        self.head_norm = RMSNorm(C, cfg.kernels)
        self.to_pixels = nn.Linear(C, pd, bias=False)
        T_max = max(L.T for L in self.layouts.values()) + 64  # room for decoding past the answer slot
        D = C // cfg.heads
        angles = torch.outer(torch.arange(T_max).float(), cfg.rope_base ** (-torch.arange(0, D, 2).float() / D))
        self.register_buffer("cos", angles.cos(), persistent=False)  # (T_max, D/2)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for m in [b.ada for b in self.head] + [self.to_pixels]:  # flow head starts at v = 0, as DiT
            nn.init.zeros_(m.weight)

    def num_params(self):
        total = sum(p.numel() for p in self.parameters())
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return {"total": total, "matmul": matmul}

    def flops_per_sample(self, task):
        """Training FLOPs (forward + backward) of one sample: 6 per matmul weight per token that passes through
        it, plus 12 x width per query-key pair per attention layer (dense, as nanoGPT counts)."""
        cfg, L = self.cfg, self.layouts[TASK_GROUP[task]]
        mm = lambda *mods: sum(m.weight.numel() for mod in mods for m in mod.modules() if isinstance(m, nn.Linear))
        size = lambda s: s.stop - s.start
        n_sem, n_pix, n_gen = size(L.sem), size(L.clean) + size(L.noisy), size(L.noisy)
        P = (L.noisy.start + 1) * (n_gen > 0)  # refiner tokens: the condition prefix and CLS
        ada = sum(b.ada.weight.numel() for b in self.head)  # used once per sample, like the timestep MLP
        weights_x_tokens = (mm(self.blocks) // (2 if cfg.mot else 1) * L.T  # each token uses one MoT expert
                            + mm(self.enc_in, self.encoder, self.adapter) * n_sem + mm(self.pix_in) * n_pix
                            + mm(self.src_pix, self.src_sem) * (n_sem > 0) * n_gen
                            + mm(self.lm_head) * size(L.answer) + mm(self.refiner) * P
                            + (mm(self.head, self.to_pixels) - ada) * n_gen + (ada + mm(self.t_mlp)) * (n_gen > 0))
        pairs = (cfg.depth * L.T ** 2 + cfg.enc_depth * n_sem ** 2 + cfg.head_depth * n_gen ** 2
                 + cfg.refiner_layers * P ** 2)
        return 6 * weights_x_tokens + 12 * cfg.width * pairs

    # --- the trunk ---
    def check_image(self, x):
        S = self.cfg.image_size
        if x.shape[1:] != (3, S, S):
            raise ValueError(f"image batch {tuple(x.shape)} must be (B, 3, {S}, {S}) (UMMConfig.image_size={S})")
        return x

    def semantic_tokens(self, img):  # (B, 3, S, S) in [-1, 1] -> (B, N, C)
        x = self.enc_in(patchify(self.check_image(img), self.cfg.patch)) + grid(self.enc_pos)  # (B, N, C)
        for blk in self.encoder:
            x = blk(x)  # no mask: bidirectional
        return self.adapter(self.enc_norm(x))

    def pixel_tokens(self, patches):  # (B, N, 3 p p) -> (B, N, C)
        return self.pix_in(patches) + grid(self.pix_pos)

    def embed(self, task, tokens, sem=None, source=None, x_t=None, temb=None, keep_sem=None, keep_pix=None):
        """Input vectors (B, T, C) and key visibility (B, T) of one task's sequences."""
        L = self.layouts[task]
        if tokens.shape[1] != L.T:
            raise ValueError(f"{task} tokens have length {tokens.shape[1]}, the layout needs {L.T}: use collate()")
        x = self.tok_emb(tokens)  # (B, T, C)
        vis = tokens != PAD  # (B, T): pads and dropped text are invisible
        if task == "vqa":
            x[:, L.sem], vis[:, L.sem] = self.semantic_tokens(sem), True
        if task != "vqa":
            x[:, L.noisy], vis[:, L.noisy] = self.pixel_tokens(x_t) + temb[:, None], True
        if task == "edit":
            sem, src = self.semantic_tokens(source), patchify(self.check_image(source), self.cfg.patch)
            x[:, L.sem], vis[:, L.sem] = sem, keep_sem[:, None]
            x[:, L.clean], vis[:, L.clean] = self.pixel_tokens(src), keep_pix[:, None]
            # Each noisy token also gets the kept source tokens of its own patch, as InstructPix2Pix stacks the
            # source onto the noisy input: keeping what should stay is then local. Through attention alone the
            # tiny model had not learned to copy after 3,600 pretraining steps (its x0 error at t = 0.9 was the
            # same with and without the source), so every edit redrew the scene from the text.
            x[:, L.noisy] += (keep_sem[:, None, None] * self.src_sem(sem)
                              + keep_pix[:, None, None] * self.src_pix(src))
        return x, vis

    def trunk(self, x, mask, pos0=0, gen=None, caches=None):  # x (B, T, C) at positions pos0.. -> (B, T, C)
        cos, sin = self.cos[pos0:pos0 + x.shape[1]], self.sin[pos0:pos0 + x.shape[1]]  # (T, D/2)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, cos, sin, gen, caches[i] if caches is not None else None)
        return x

    def mask(self, task, vis):
        return attention_mask(getattr(self, f"img_{task}"), vis, self.cfg.flex and vis.is_cuda)

    # --- the flow head ---
    def velocity_patches(self, task, sub, x_t, t, keep_txt, keep_sem, keep_pix):
        """Velocity (B, N, 3 p p) for noisy patches x_t (B, N, 3 p p) at times t (B,) under per-sample conditions."""
        L = self.layouts[task]
        tokens = sub["tokens"].clone()
        tokens[:, L.text] = torch.where(keep_txt[:, None], tokens[:, L.text], PAD)  # a dropped text is all [PAD]
        temb = self.t_mlp(timestep_features(t, self.cfg.width))  # (B, C)
        x, vis = self.embed(task, tokens, sub.get("sem"), sub.get("source"), x_t, temb, keep_sem, keep_pix)
        h = self.trunk(x, self.mask(task, vis), gen=L.noisy)  # (B, T, C)
        if self.cls is not None:  # the refiner reads the condition prefix, bidirectionally, through a CLS
            r = torch.cat([h[:, :L.noisy.start], self.cls.expand(h.shape[0], 1, -1)], 1)  # (B, P + 1, C)
            m = F.pad(vis[:, :L.noisy.start], (0, 1), value=True)[:, None, None]  # (B, 1, 1, P + 1)
            for blk in self.refiner:
                r = blk(r, m)
            temb = temb + r[:, -1]
        y = h[:, L.noisy]  # (B, N, C)
        for blk in self.head:
            y = blk(y, c=temb)
        # The head predicts the clean patches, and the velocity follows from x_t = (1 - t) x_0 + t eps as
        # (x_t - x_0) / t (JiT's x-prediction): clean patches lie on a low-dimensional manifold that a narrow
        # model can reach, 192-dim noise is not, and v-prediction left visible noise in every sample.
        x0 = self.to_pixels(self.head_norm(y))  # (B, N, 3 p p)
        return (x_t - x0) / t.clamp(min=0.05)[:, None, None]

    def velocity(self, task, sub, x_t, t, txt=True, img=True):
        """Velocity (B, 3, S, S) of noisy images x_t at t (float or (B,)), with or without text / source image.
        The clean pixel source counts as part of the image condition unless training always dropped it."""
        task, B = TASK_GROUP[task], x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float, device=x_t.device).expand(B)  # (B,)
        flag = lambda on: torch.full((B,), bool(on), device=x_t.device)
        pix = img and self.cfg.src_pixel_dropout < 1
        v = self.velocity_patches(task, sub, patchify(self.check_image(x_t), self.cfg.patch), t,
                                  flag(txt), flag(img), flag(pix))
        return unpatchify(v, self.cfg.patch)

    def guided_velocity(self, task, sub, x_t, t, txt_scale=1.0, img_scale=1.0):
        """t2i: v_u + w (v_c - v_u), w = txt_scale. edit (Ovis-U1's dual guidance):
        v(0,0) + s_img [v(img,0) - v(0,0)] + s_txt [v(img,txt) - v(img,0)]."""
        v = lambda txt, img: self.velocity(task, sub, x_t, t, txt, img)
        if TASK_GROUP[task] == "t2i":
            v_u = v(False, False)
            return v_u + txt_scale * (v(True, False) - v_u)
        v_00, v_i0 = v(False, False), v(False, True)
        return v_00 + img_scale * (v_i0 - v_00) + txt_scale * (v(True, True) - v_i0)

    @torch.no_grad()
    def sample(self, task, sub, steps=20, shift=1.0, txt_scale=1.0, img_scale=1.0, generator=None):
        """Generate (t2i) or edit (edit) the images of a collated sub-batch: (B, 3, S, S) in [-1, 1]."""
        S, B = self.cfg.image_size, sub["tokens"].shape[0]
        noise = torch.randn(B, 3, S, S, generator=generator).to(sub["tokens"].device)
        fn = lambda x, t: self.guided_velocity(task, sub, x, t, txt_scale, img_scale)
        return euler(fn, noise, steps, shift).clamp(-1, 1)

    # --- training ---
    def forward(self, batch, noise=None):  # DDP and torch.compile wrap forward: it is the training loss
        return self.loss(batch, noise)

    def draw_noise(self, batch):
        """The flow loss's randomness, {generation task: (t (B,), eps (B, N, 3 p p), u (3, B))}: logit-normal
        times, Gaussian noise, and uniforms for the three condition dropouts. Training draws it outside the
        compiled loss: inside its graph a compiler may reorder the draws (Inductor did, in torch 2.11), and
        from outside the same seed gives the same noise whether the loss is compiled or not."""
        noise, p = {}, self.cfg.patch
        for task in ("t2i", "edit"):
            if task in batch:
                B, dev = batch[task]["target"].shape[0], batch[task]["target"].device
                noise[task] = (torch.sigmoid(torch.randn(B, device=dev)), torch.randn(B, self.n, 3 * p * p, device=dev),
                               torch.rand(3, B, device=dev))
        return noise

    def loss(self, batch, noise=None):
        """(total, parts): CE over vqa answer tokens, flow MSE over noisy tokens; parts are detached and hold
        'ce' / 'flow' only when the batch has those tasks, plus 'flow_t<k>' = flow loss with t in [k/4, (k+1)/4)
        (NaN when no sample's t fell in that bin). noise: from draw_noise(batch), drawn here if not given."""
        cfg, parts, total = self.cfg, {}, 0.0
        noise = self.draw_noise(batch) if noise is None else noise
        if "vqa" in batch:
            s, L = batch["vqa"], self.layouts["vqa"]
            x, vis = self.embed("vqa", s["tokens"], sem=s["sem"])
            h = self.trunk(x, self.mask("vqa", vis))  # (B, T, C)
            logits = self.lm_head(self.norm(h[:, L.answer.start - 1:L.answer.stop - 1]))  # (B, A, V): next tokens
            ce = F.cross_entropy(logits.flatten(0, 1).float(), s["tokens"][:, L.answer].flatten(), ignore_index=PAD)
            total, parts["ce"] = total + cfg.ce_weight * ce, ce.detach()
        errs, ts = [], []
        for task in ("t2i", "edit"):
            if task not in batch:
                continue
            s = batch[task]
            x0 = patchify(self.check_image(s["target"]), cfg.patch)  # (B, N, 3 p p)
            B, dev = x0.shape[0], x0.device
            t, eps, u = noise[task]
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps  # (B, N, 3 p p)
            # (B,) kept conditions: text, semantic source, pixel source
            drop = (cfg.txt_dropout, cfg.src_dropout, cfg.src_pixel_dropout)
            if self.training:
                keep = [u[i] >= p for i, p in enumerate(drop)]
            else:  # all kept, but a source that training always drops stays dropped
                keep = [torch.full((B,), p < 1, device=dev) for p in drop]
            v = self.velocity_patches(task, s, x_t, t, *keep)
            errs.append((v.float() - (eps - x0)).pow(2).mean((1, 2)))  # (B,)
            ts.append(t)
        if errs:
            err, t = torch.cat(errs), torch.cat(ts)  # (B_gen,)
            flow = err.mean()
            total, parts["flow"] = total + cfg.flow_weight * flow, flow.detach()
            # The mean of each t-bin without `if bin not empty` (a host sync and a graph break under
            # torch.compile): an empty bin divides 0 by 0, and the training log skips its NaN.
            bins = F.one_hot((t * 4).long().clamp(max=3), 4).to(err.dtype)  # (B_gen, 4)
            per_bin = (err.detach() @ bins) / bins.sum(0)  # (4,)
            for k in range(4):
                parts[f"flow_t{k}"] = per_bin[k]
        return total, parts

    # --- text decoding ---
    @torch.no_grad()
    def generate_text(self, sub, max_new_tokens=None, temperature=0.0, use_cache=True, generator=None):
        """Answer the questions of a collated 'vqa' sub-batch: (B, max_new_tokens) ids (read up to EOS).
        Greedy at temperature 0, else sampled; use_cache=False recomputes the whole prefix every token."""
        L, max_new = self.layouts["vqa"], max_new_tokens or self.cfg.answer_len
        P = L.answer.start  # the prompt: BOS, semantic image, question and SEP
        if P + max_new > self.cos.shape[0]:
            raise ValueError(f"max_new_tokens={max_new} exceeds the {self.cos.shape[0] - P} positions RoPE has")
        x, vis = self.embed("vqa", sub["tokens"], sem=sub["sem"])
        x, vis = x[:, :P], vis[:, :P]  # (B, P, C), (B, P)
        img = F.pad(self.img_vqa, (0, max_new))  # (P + A + max_new,): answers are text
        caches = [[] for _ in self.blocks] if use_cache else None
        out, new = [], x
        for i in range(max_new):
            if use_cache:  # prefill once, then one position at a time
                mask = attention_mask(img[:P], vis, False) if i == 0 else vis[:, None, None, :]
                h = self.trunk(new, mask, pos0=x.shape[1] - new.shape[1], caches=caches)
            else:
                h = self.trunk(x, attention_mask(img[:x.shape[1]], vis, False))  # (B, T, C)
            logits = self.lm_head(self.norm(h[:, -1])).float()  # (B, V)
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)  # (B, 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            new = self.tok_emb(nxt)  # (B, 1, C)
            x, vis = torch.cat([x, new], 1), F.pad(vis, (0, 1), value=True)
        return torch.cat(out, 1)


def shift_time(t, s):  # s > 1 spends more of the steps near t = 1 (noise), where larger images need them
    return s * t / (1 + (s - 1) * t)


def euler(velocity, x, steps, shift=1.0):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) down to t = 0 (data)."""
    ts = shift_time(torch.linspace(1, 0, steps + 1), shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t).item() * velocity(x, t.item())
    return x


def collate(samples, cfg, tokenizer):
    """synth samples -> {group: dict of tensors} (see the module docstring); images must match cfg.image_size."""
    if [tokenizer.token_to_id(s) for s in ("[PAD]", "[BOS]", "[EOS]", "[BOI]", "[EOI]", "[SEP]")] != list(range(6)):
        raise ValueError("tokenizer special ids differ from model.py's PAD..SEP = 0..5: use synth.get_tokenizer")
    S, groups, layouts = cfg.image_size, {}, {task: Layout(cfg, task) for task in ("vqa", "t2i", "edit")}

    def image(a):  # uint8 (S, S, 3) -> float (3, S, S) in [-1, 1]
        a = torch.as_tensor(np.asarray(a))
        if tuple(a.shape) != (S, S, 3):
            raise ValueError(f"image of shape {tuple(a.shape)} must be ({S}, {S}, 3) (UMMConfig.image_size={S})")
        return a.permute(2, 0, 1).float() / 127.5 - 1

    for row, s in enumerate(samples):
        task = TASK_GROUP[s["task"]]
        L, ids = layouts[task], tokenizer.encode(s["text"]).ids + ([SEP] if task == "vqa" else [])
        limit = getattr(cfg, f"{task}_text")
        if len(ids) > limit:
            raise ValueError(f"text of {len(ids)} tokens exceeds UMMConfig.{task}_text={limit}: raise {task}_text")
        tokens = torch.full((L.T,), PAD)  # (T,)
        tokens[0] = BOS
        tokens[L.text.stop - len(ids):L.text.stop] = torch.tensor(ids, dtype=torch.long)  # left-padded text
        item = {"rows": torch.tensor(row), "tokens": tokens}
        if task == "vqa":
            item["sem"] = image(s["image"])
            if s.get("answer") is not None:  # absent at inference
                ans = tokenizer.encode(s["answer"]).ids + [EOS]
                if len(ans) > cfg.answer_len:
                    raise ValueError(f"answer of {len(ans)} tokens + EOS exceeds UMMConfig.answer_len={cfg.answer_len}")
                tokens[L.answer.start:L.answer.start + len(ans)] = torch.tensor(ans, dtype=torch.long)
        else:
            tokens[L.boi], tokens[L.eoi] = BOI, EOI
            if task == "edit":
                item["source"] = image(s["image"])
            if s.get("target") is not None:
                item["target"] = image(s["target"])
        groups.setdefault(task, []).append(item)
    return {task: {k: torch.stack([it[k] for it in items]) for k in items[0]} for task, items in groups.items()}


# --- loading a trained model (checkpoints are written by train.py) ---
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
        raise ValueError(f"checkpoint file {file} is missing or corrupt ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise ValueError(f"checkpoint file {file} lacks weight {k!r}: it was made by a different model config")
        if state[k].shape != v.shape:
            raise ValueError(f"checkpoint file {file}: {k} has shape {tuple(state[k].shape)}, this model needs "
                             f"{tuple(v.shape)} (different preset or width?)")
    extra = set(state) - set(own)
    if extra:
        raise ValueError(f"checkpoint file {file} has weights this model lacks ({sorted(extra)[0]}, ...): "
                         f"check --mot/--refiner_layers")
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


def load_checkpoint(path, weights="ema", device="cpu"):
    """(model in eval mode, tokenizer, meta) from a step_* checkpoint folder or a run folder (its newest)."""
    from tokenizers import Tokenizer
    ckpt = newest_checkpoint(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise ValueError(f"no checkpoint at {path}: pass a step_NNNNNN folder or a run folder that holds one")
    meta = read_meta(ckpt)
    try:
        tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    except Exception as e:
        raise ValueError(f"checkpoint file {ckpt}/tokenizer.json is missing or corrupt: {e}") from None
    model = UMM(UMMConfig(**meta["model"]))
    load_weights(ckpt, f"{weights}.safetensors", model)
    return model.to(device).eval(), tok, meta


if __name__ == "__main__":  # the measurements in the module docstring
    import synth

    torch.manual_seed(0)
    for name in PRESETS:
        tok = synth.get_tokenizer("tiny" if name == "tiny" else "default")
        m = UMM(UMMConfig.preset(name, vocab_size=tok.get_vocab_size()))
        c, n = m.cfg, m.num_params()
        print(f"{name}: width {c.width} depth {c.depth} heads {c.heads}: {n['total'] / 1e6:.2f} M params "
              f"({n['matmul'] / 1e6:.2f} M matmul); T vqa/t2i/edit {[L.T for L in m.layouts.values()]}; GFLOPs/sample "
              + " ".join(f"{t} {m.flops_per_sample(t) / 1e9:.2f}" for t in ("vqa", "t2i", "edit")))

    def best_ms(fn, repeats=10):  # the minimum is the least disturbed by other processes
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    tok = synth.get_tokenizer("tiny")
    model = UMM(UMMConfig.preset("tiny", vocab_size=tok.get_vocab_size()))
    batch = collate([synth.make_sample("tiny", synth.TASKS[i % 4], "train", i) for i in range(32)], model.cfg, tok)
    ms = best_ms(lambda: model.loss(batch)[0].backward())
    print(f"tiny forward+backward, 32 mixed samples: {ms:.0f} ms (best of 10, {torch.get_num_threads()} threads)")
    model.eval()
    for B in (1, 32):
        vqa = collate([synth.make_sample("tiny", "vqa", "val", i) for i in range(B)], model.cfg, tok)["vqa"]
        cached, uncached = (best_ms(lambda: model.generate_text(vqa, 6, use_cache=c)) for c in (True, False))
        print(f"tiny decoding 6 tokens for {B} questions: {cached:.1f} ms with KV cache, {uncached:.1f} ms without "
              f"({uncached / cached:.1f}x)")
