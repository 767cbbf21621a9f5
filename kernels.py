"""
Hand-written Triton kernels for the memory-bound ops around attention, and the timing helpers
that every benchmark of the project uses.

    python kernels.py                          # benchmark table (needs a CUDA device)
    python -m pytest -q tests/test_kernels.py  # without CUDA: in Triton's interpreter

The math of the four ops is model.py's: rmsnorm, rmsnorm_modulate, rope and swiglu, plain torch.
Each op has one section here: the math with its backward, Triton forward and backward kernels, a
`torch.library` custom op (forward and backward are both opaque ops with fake implementations,
so `torch.compile(fullgraph=True)` traces them without graph breaks) and a public function of the
same name and arguments as model.py's:

    rmsnorm(x, weight, eps=1e-6)              # x (..., C), weight (C,)
    rmsnorm_modulate(x, scale, shift, eps=1e-6)  # x (B, T, C), scale/shift (B, C)
    rope(x, cos, sin)                         # x (B, H, T, D), cos/sin (T, D/2) fp32
    swiglu(gate, up)                          # same shapes (..., F)

model.py calls one of these when the model's config asks for kernels (UMMConfig.kernels) and
`can_run(op, x)` holds: `USE[op]` below, triton imports, and the tensor is on CUDA or the kernels
were built for the interpreter; else it runs its own torch version.
Triton decides interpreter-or-GPU when it decorates a kernel, i.e. when this file is imported,
so TRITON_INTERPRET=1 must be in the environment before `import kernels` (tests/conftest.py
sets it on machines without CUDA).

Every kernel loads its inputs in their own dtype, computes in fp32 and stores in the output
dtype, so bf16 activations are rounded once. Float scalars are cast to fp32 inside the kernels
(Inductor may hand them over as fp64). Reductions over rows (dweight, dscale, dshift) are
deterministic: each program sums its own rows into a row of a partial buffer, and torch sums
the partial buffer; there are no atomics. Offsets are int32: tensors up to 2^31 elements.

Benchmark status (`python kernels.py`, forward+backward in the dtypes of a bf16-autocast training
step): not yet measured, this file was written on machines without a GPU. All ops are in USE until
the table is run on the target GPU; an op whose Triton time does not beat the compiled reference
on both `small` and `base` must be set to False in USE, with the numbers in README. No further
op (flow-matching interpolation + MSE, LM-head cross-entropy) is fused until a profile of a GPU
training step shows it is worth it: the vocabulary is a few hundred tokens, an image 64×64×3.
Without a GPU, tests/test_kernels.py checks that every launch the benchmark makes compiles for
the H100/H200 (sm_90) with no register spills (README's Speed section has the register counts).

The timing helpers at the end (device_name, median_seconds, measured_matmul_flops, rates,
print_bench_row) are what train.py's log and --bench row, sample.py's --bench line, python
model.py and the table here report with; they import nothing from the project.
"""

import functools
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    # Stand-ins so the @triton.jit definitions below still evaluate; they are never launched.
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)

# Read once: it must agree with how triton.jit built the kernels below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Ops that use their Triton kernel when the model asks for kernels (see the docstring above).
USE = {"rmsnorm": True, "rmsnorm_modulate": True, "rope": True, "swiglu": True}


def can_run(op: str, x: Tensor) -> bool:
    """Whether op's Triton kernel runs on x: kept on in USE, triton imported, and a GPU tensor or
    the interpreter."""
    return USE[op] and HAS_TRITON and (x.is_cuda or INTERPRET)


def _rows(t: Tensor, C: int) -> Tensor:
    """A (N, C) view of t whose last dimension is contiguous, copying only if it has to be."""
    t = t.reshape(-1, C)
    return t if t.stride(-1) == 1 else t.contiguous()


def _max_programs(device: torch.device) -> int:
    # Enough programs to fill the GPU for the row-reduction kernels; the fewer programs, the
    # smaller the partial buffer. Under the interpreter a few are enough to exercise the loop.
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _row_block(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a tile of whole rows, about 4096 elements, so one program holds a row."""
    BLOCK_C = triton.next_power_of_2(C)
    assert BLOCK_C <= 8192, "a row must fit in one tile; larger C needs a looped kernel"
    return max(1, min(16, 4096 // BLOCK_C)), BLOCK_C


# -----------------------------------------------------------------------------
# RMSNorm
#   r = 1 / sqrt(mean_c(x²) + eps),  x̂ = x·r,  y = x̂·w
# backward, with g = dy·w:
#   dx = r·(g − x̂·mean_c(g·x̂)),  dw = Σ_rows dy·x̂


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, N, C, eps,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + tl.cast(eps, tl.float32))
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, N, C, rows_per_program,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < row_end) & (cols[None, :] < C)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / C)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW_PARTIAL + pid * C + cols, dw, mask=cols < C)


@torch.library.custom_op("nanoumm::rmsnorm", mutates_args=())
def _rmsnorm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    x2 = _rows(x, C)  # (N, C)
    N = x2.shape[0]
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    BLOCK_R, BLOCK_C = _row_block(C)
    _rmsnorm_fwd_kernel[(triton.cdiv(N, BLOCK_R),)](
        x2, weight.contiguous(), y, rstd, x2.stride(0), N, C, eps, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y.view(x.shape), rstd


@_rmsnorm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("nanoumm::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    x2, dy2 = _rows(x, C), _rows(dy, C)
    N = x2.shape[0]
    BLOCK_R, BLOCK_C = _row_block(C)
    programs = min(triton.cdiv(N, BLOCK_R), _max_programs(x.device))
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), N, C,
        triton.cdiv(N, programs), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


@_rmsnorm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rmsnorm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rmsnorm_backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rmsnorm_bwd_op(dy, x, weight, rstd)
    return dx, dw, None


_rmsnorm_op.register_autograd(_rmsnorm_backward, setup_context=_rmsnorm_setup)


def rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension with a learned gain; statistics in fp32, output in x's
    dtype."""
    return _rmsnorm_op(x, weight, eps)[0]


# -----------------------------------------------------------------------------
# RMSNorm + adaLN modulation (the flow head), per-sample scale and shift, no gain
#   x̂ = x·r (as above),  y[b,t] = x̂[b,t]·(1 + scale[b]) + shift[b]
# backward, with g = dy·(1 + scale[b]):
#   dx = r·(g − x̂·mean_c(g·x̂)),  dscale[b] = Σ_t dy·x̂,  dshift[b] = Σ_t dy
# The sums over t are per sample: program (b, p) sums its chunk of sample b's rows into row
# (b, p) of a partial buffer.


@triton.jit
def _modulate_fwd_kernel(X, SCALE, SHIFT, Y, RSTD, T, C, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (t[:, None] < T) & (cols[None, :] < C)
    offs = b * T * C + t[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + tl.cast(eps, tl.float32))
    y = x * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + b * T + t, rstd, mask=t < T)


@triton.jit
def _modulate_bwd_kernel(DY, X, SCALE, RSTD, DX, DSCALE_PARTIAL, DSHIFT_PARTIAL, T, C,
                         rows_per_program, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    scale = tl.load(SCALE + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    dscale = tl.zeros((BLOCK_C,), tl.float32)
    dshift = tl.zeros((BLOCK_C,), tl.float32)
    t_start = p * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for start in range(t_start, t_end, BLOCK_R):
        t = start + tl.arange(0, BLOCK_R)
        mask = (t[:, None] < t_end) & (cols[None, :] < C)
        offs = b * T * C + t[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * T + t, mask=t < t_end, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * (1.0 + scale[None, :])
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / C)[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dscale += tl.sum(dy * xhat, axis=0)
        dshift += tl.sum(dy, axis=0)
    partial = (b * tl.num_programs(1) + p) * C + cols
    tl.store(DSCALE_PARTIAL + partial, dscale, mask=cols < C)
    tl.store(DSHIFT_PARTIAL + partial, dshift, mask=cols < C)


@torch.library.custom_op("nanoumm::rmsnorm_modulate", mutates_args=())
def _modulate_op(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    B, T, C = x.shape
    # scale and shift are chunks of one adaLN projection; dshift is returned in scale's dtype.
    assert scale.shape == shift.shape == (B, C) and scale.dtype == shift.dtype
    x = x.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    BLOCK_R, BLOCK_C = _row_block(C)
    _modulate_fwd_kernel[(B, triton.cdiv(T, BLOCK_R))](
        x, scale.contiguous(), shift.contiguous(), y, rstd, T, C, eps,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y, rstd


@_modulate_op.register_fake
def _(x, scale, shift, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=torch.float32)


@torch.library.custom_op("nanoumm::rmsnorm_modulate_bwd", mutates_args=())
def _modulate_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, rstd: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    B, T, C = x.shape
    x, dy = x.contiguous(), dy.contiguous()
    BLOCK_R, BLOCK_C = _row_block(C)
    programs = min(triton.cdiv(T, BLOCK_R), max(1, _max_programs(x.device) // B))  # per sample
    dx = torch.empty_like(x)
    dscale_partial = torch.empty((B, programs, C), dtype=torch.float32, device=x.device)
    dshift_partial = torch.empty((B, programs, C), dtype=torch.float32, device=x.device)
    _modulate_bwd_kernel[(B, programs)](
        dy, x, scale.contiguous(), rstd, dx, dscale_partial, dshift_partial, T, C,
        triton.cdiv(T, programs), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return dx, dscale_partial.sum(1).to(scale.dtype), dshift_partial.sum(1).to(scale.dtype)


@_modulate_bwd_op.register_fake
def _(dy, x, scale, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _modulate_setup(ctx, inputs, output):
    x, scale, shift, eps = inputs
    ctx.save_for_backward(x, scale, output[1])


def _modulate_backward(ctx, dy, drstd):
    x, scale, rstd = ctx.saved_tensors
    dx, dscale, dshift = _modulate_bwd_op(dy, x, scale, rstd)
    return dx, dscale, dshift, None


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def rmsnorm_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: RMSNorm without gain, then per-sample `(1 + scale)` and `+ shift`; output in x's
    dtype."""
    return _modulate_op(x, scale, shift, eps)[0]


# -----------------------------------------------------------------------------
# RoPE, half-split ("rotate_half", GPT-NeoX) layout; x1, x2 = the two halves of the head dim
#   y1 = x1·cos − x2·sin,  y2 = x1·sin + x2·cos
# The backward is the inverse rotation (sin → −sin):
#   dx1 = dy1·cos + dy2·sin,  dx2 = −dy1·sin + dy2·cos
# cos and sin are fixed tables: no gradient flows to them.


@triton.jit
def _rope_kernel(X, COS, SIN, Y, stride_b, stride_h, stride_t, H, T, HALF,
                 INVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < T) & (d[None, :] < HALF)
    x1_ptr = X + b * stride_b + h * stride_h + t[:, None] * stride_t + d[None, :]
    x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS + t[:, None] * HALF + d[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + t[:, None] * HALF + d[None, :], mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    y1_ptr = Y + bh * T * 2 * HALF + t[:, None] * 2 * HALF + d[None, :]
    tl.store(y1_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y1_ptr + HALF, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def _rope_launch(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    B, H, T, D = x.shape
    assert cos.shape == sin.shape == (T, D // 2)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    BLOCK_D = triton.next_power_of_2(D // 2)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_D))
    # x may be a strided view (q or k transposed out of a fused qkv projection): pass its strides.
    _rope_kernel[(B * H, triton.cdiv(T, BLOCK_T))](
        x, cos.contiguous(), sin.contiguous(), y, x.stride(0), x.stride(1), x.stride(2), H, T,
        D // 2, INVERSE=inverse, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return y


@torch.library.custom_op("nanoumm::rope", mutates_args=())
def _rope_op(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _rope_launch(x, cos, sin, inverse=False)


@_rope_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.custom_op("nanoumm::rope_bwd", mutates_args=())
def _rope_bwd_op(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _rope_launch(dy, cos, sin, inverse=True)


@_rope_bwd_op.register_fake
def _(dy, cos, sin):
    return dy.new_empty(dy.shape)


def _rope_setup(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_bwd_op(dy, cos, sin), None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (B, H, T, D) by fp32 tables cos, sin (T, D/2); output in x.dtype."""
    return _rope_op(x, cos, sin)


# -----------------------------------------------------------------------------
# SwiGLU, with σ the logistic sigmoid
#   y = silu(g)·u = g·σ(g)·u
# backward:
#   du = dy·g·σ(g),  dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))
# The backward recomputes σ(g) rather than saving it: one less activation in memory.


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, N, F,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < N) & (cols[None, :] < F)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None] * F + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, N, F,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < N) & (cols[None, :] < F)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dy * g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    out = rows[:, None] * F + cols[None, :]
    tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, du.to(DU.dtype.element_ty), mask=mask)


def _swiglu_blocks(F: int) -> tuple[int, int]:
    BLOCK_F = min(1024, triton.next_power_of_2(F))
    return max(1, 2048 // BLOCK_F), BLOCK_F


@torch.library.custom_op("nanoumm::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    F = gate.shape[-1]
    # gate and up are often the two halves of one projection's output: row-strided views, no copy.
    g2, u2 = _rows(gate, F), _rows(up, F)
    N = g2.shape[0]
    y = torch.empty((N, F), dtype=gate.dtype, device=gate.device)
    BLOCK_R, BLOCK_F = _swiglu_blocks(F)
    _swiglu_fwd_kernel[(triton.cdiv(N, BLOCK_R), triton.cdiv(F, BLOCK_F))](
        g2, u2, y, g2.stride(0), u2.stride(0), N, F, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)
    return y.view(gate.shape)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("nanoumm::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    F = gate.shape[-1]
    dy2, g2, u2 = _rows(dy, F), _rows(gate, F), _rows(up, F)
    N = g2.shape[0]
    dg = torch.empty((N, F), dtype=gate.dtype, device=gate.device)
    du = torch.empty((N, F), dtype=up.dtype, device=up.device)
    BLOCK_R, BLOCK_F = _swiglu_blocks(F)
    _swiglu_bwd_kernel[(triton.cdiv(N, BLOCK_R), triton.cdiv(F, BLOCK_F))](
        dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), N, F,
        BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)
    return dg.view(gate.shape), du.view(up.shape)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dy, gate, up)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate)·up, elementwise; output in gate.dtype."""
    return _swiglu_op(gate, up)


# -----------------------------------------------------------------------------
# Timing: what every benchmark here reports with. A time is reported under device_name;
# median_seconds times a call; MFU divides the model's training FLOP/s by a peak, by default
# measured_matmul_flops of the same device.

def device_name(device: torch.device) -> str:
    """The name a timing is reported under: the GPU's model, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timings(fn, device: torch.device, repeats: int) -> list:
    """Wall times of `repeats` calls of fn() after one warm-up call (which builds kernels, and
    lets the BLAS library pick its own); on CUDA each call is timed to the end of its GPU work."""
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


def median_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """Median wall time of fn() over `repeats` calls (see timings)."""
    return statistics.median(timings(fn, device, repeats))


def measured_matmul_flops(device: torch.device, fresh: bool = False) -> float:
    """Best rate of 10 timings of a large square matmul in the training dtype (bf16 on CUDA, fp32
    on CPU), measured once per device ("cuda" is the current GPU) unless `fresh`. The best, not
    the median: other work on the device only ever slows a timing down.

    Measured rather than read off a data sheet: it is what this device, at its clocks and power
    limit, reaches on the best case of the op the model spends its time in. The data-sheet dense
    bf16 peak of an H100/H200 SXM is 989 TFLOP/s; MFU against it is lower by the ratio printed."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if fresh:
        _matmul_flops.cache_clear()
    return _matmul_flops(device)


@functools.cache
def _matmul_flops(device: torch.device) -> float:
    n, dtype, reps = (1024, torch.float32, 1)
    if device.type == "cuda":
        n, dtype, reps = (8192, torch.bfloat16, 10)
    a = torch.ones(n, n, device=device, dtype=dtype)  # ones, not randn: the RNG stays untouched

    def matmuls():
        for _ in range(reps):
            a @ a

    return 2 * n ** 3 * reps / min(timings(matmuls, device, repeats=10))


def rates(model, counts: dict, batch_size: int, seconds: float, peak: float) -> dict:
    """Throughput of training steps of `seconds` each, each of batch_size samples mixed as
    `counts` (samples per task of one micro-batch): ms/step, tokens/s, images/s, and MFU, the
    model's FLOP/s (model.flops_per_sample) over `peak` FLOP/s."""
    micro_batch = sum(counts.values())
    tokens = sum(n * model.tokens_per_sample(task) for task, n in counts.items())
    images = sum(n for task, n in counts.items() if task != "vqa")
    flops = sum(n * model.flops_per_sample(task) for task, n in counts.items())
    return {"ms_per_step": seconds * 1e3,
            "tokens_per_s": tokens / micro_batch * batch_size / seconds,
            "images_per_s": images / micro_batch * batch_size / seconds,
            "mfu": flops / micro_batch * batch_size / seconds / peak}


def mfu_text(mfu: float, peak_given: bool) -> str:
    """MFU as printed: one above 100% says that the peak it divides by is wrong, and why."""
    if mfu <= 1:
        return f"{100 * mfu:.1f}%"
    why = "--peak_tflops is below this device's" if peak_given else "measured twice, low twice"
    return f"{100 * mfu:.1f}% (over 100%: the peak it divides by is wrong; {why})"


def print_bench_row(preset: str, setup: str, device: torch.device, r: dict) -> None:
    """Print train.py's --bench result r as one row of README's speed table, under its header."""
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
    print("| preset | setup | device | tokens/s | images/s | ms/step | MFU | of peak TFLOP/s "
          "| peak mem GiB | recompiles after warm-up |")
    print(f"| {preset} | {setup} | {device_name(device)} | {r['tokens_per_s']:,.0f} | "
          f"{r['images_per_s']:,.1f} | {r['ms_per_step']:.1f} | {mfu_text(r['mfu'], False)} | "
          f"{r['peak_tflops']:.4g} | {mem} | {r['recompiles']} |")


# -----------------------------------------------------------------------------
# Benchmark: forward+backward of each op on the shapes of the model's presets: the edit layout
# (the longest sequence) at the GPU presets' micro-batch, width C, SwiGLU width F, heads of
# head_dim (rope runs on queries and keys concatenated, 2C/head_dim heads), and the flow head's
# adaLN norms on the T_head noisy tokens only. Against model.py's torch versions, eager and
# compiled. This is bench code: the only place this file imports model.py (which imports it).

BENCH_MICRO_BATCH = 64  # train.py's micro_batch of small and base (tests/test_kernels.py checks)


def preset_shapes():
    """{preset: op shapes} for small and base, read from model.py so they never go stale."""
    import model

    out = {}
    for name in ("small", "base"):
        cfg = model.UMMConfig.preset(name, vocab_size=1)
        out[name] = dict(B=BENCH_MICRO_BATCH, T=model.Layout(cfg, "edit").T, C=cfg.width,
                         head_dim=cfg.width // cfg.heads, F=cfg.hidden,
                         T_head=(cfg.image_size // cfg.patch) ** 2)
    return out


def _bench_cases(B, T, C, head_dim, F, T_head, device):
    """(op, model.py's torch version, Triton op, inputs, bytes a fused forward+backward must move
    at least).

    The inputs have the dtypes and layouts of a bf16-autocast training step (train.py on CUDA):
    the residual stream stays fp32, so both norms read fp32 activations (and RMSNorm an fp32
    gain), while adaLN's scale and shift, q and k, and SwiGLU's gate and up are outputs of linear
    layers, in bf16; gate and up are the two halves of one projection, row-strided views.
    tests/test_kernels.py checks these against the calls a step of each preset really makes."""
    import model

    def leaf(*shape, dtype):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    f32, bf16 = torch.float32, torch.bfloat16
    H = 2 * C // head_dim
    angles = torch.rand(T, head_dim // 2, device=device) * 2 * math.pi
    gate, up = leaf(B, T, 2 * F, dtype=bf16).chunk(2, -1)
    # Forward reads inputs and writes the output; backward reads the saved inputs and dy and
    # writes every gradient. Per-row statistics and (B, C)/(C,) vectors are negligible.
    return [
        ("rmsnorm", model.rmsnorm, rmsnorm,
         (leaf(B, T, C, dtype=f32), leaf(C, dtype=f32), 1e-6), 5 * B * T * C * 4),
        ("rmsnorm_modulate", model.rmsnorm_modulate, rmsnorm_modulate,
         (leaf(B, T_head, C, dtype=f32), leaf(B, C, dtype=bf16), leaf(B, C, dtype=bf16), 1e-6),
         5 * B * T_head * C * 4),
        ("rope", model.rope, rope,
         (leaf(B, H, T, head_dim, dtype=bf16), angles.cos(), angles.sin()),
         4 * B * H * T * head_dim * 2),
        ("swiglu", model.swiglu, swiglu, (gate, up), 8 * B * T * F * 2),
    ]


def _fwd_bwd(fn, args):
    inputs = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    out = fn(*args)
    dy = torch.randn_like(out)
    return lambda: torch.autograd.grad(fn(*args), inputs, dy)


def benchmark():
    from triton.testing import do_bench

    device = torch.device("cuda")
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    print(f"{device_name(device)}, the dtypes of a bf16-autocast step, forward+backward, "
          f"median of do_bench, copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'preset':<7}{'op':<18}{'eager ms':>10}{'compile ms':>12}{'triton ms':>11}"
          f"{'triton GB/s':>13}{'of copy':>9}{'vs compile':>12}")
    for preset, shape in preset_shapes().items():
        for op, reference, fused_op, args, nbytes in _bench_cases(**shape, device=device):
            eager = do_bench(_fwd_bwd(reference, args), return_mode="median")
            compiled_reference = torch.compile(reference, dynamic=False)  # one preset's shapes
            compiled = do_bench(_fwd_bwd(compiled_reference, args), return_mode="median")
            fused = do_bench(_fwd_bwd(fused_op, args), return_mode="median")
            gbps = nbytes / fused / 1e6
            print(f"{preset:<7}{op:<18}{eager:>10.3f}{compiled:>12.3f}{fused:>11.3f}"
                  f"{gbps:>13.0f}{gbps / copy_gbps:>9.0%}{compiled / fused:>11.2f}x")


if __name__ == "__main__":
    if not (torch.cuda.is_available() and HAS_TRITON):
        print("kernels.py: the benchmark needs a CUDA device and triton; nothing to measure here.")
        sys.exit(0)
    benchmark()
