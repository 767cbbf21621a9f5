"""
Triton kernels against their torch references: the output and every gradient.

    python -m pytest -q tests/test_kernels.py

Without CUDA the kernels run in Triton's interpreter, in fp32 only (the interpreter has no bf16
arithmetic); tests/conftest.py sets TRITON_INTERPRET=1 before kernels is imported. With CUDA the
same checks run compiled on the GPU in fp32 and bf16, and the CPU cases are skipped.
"""

import os
import subprocess
import sys

import pytest
import torch

import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()

# (device, dtype, atol, rtol). Kernel and reference both compute in fp32 from the same inputs
# and round the result once, so they differ only by summation order (fp32: ~1e-6 relative) or,
# in bf16, by at most one ulp of the output (≤ 2^-7 ≈ 0.8% relative).
CASES = [
    pytest.param("cpu", torch.float32, 1e-5, 1e-5, id="interpreter-fp32",
                 marks=pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", torch.float32, 1e-5, 1e-5, id="cuda-fp32",
                 marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    pytest.param("cuda", torch.bfloat16, 1e-2, 1e-2, id="cuda-bf16",
                 marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
]

# (B, T, C): regular; odd and not a power of two (masked columns and rows); enough rows that the
# reduction kernels run several programs, each looping over several row blocks.
SHAPES = [(2, 8, 64), (3, 5, 48), (2, 75, 48)]


@pytest.fixture(autouse=True)
def every_kernel_on(monkeypatch):
    # Test every kernel, including any that USE turns off for lack of speed.
    for op in kernels.USE:
        monkeypatch.setitem(kernels.USE, op, True)


def leaves(device, dtype, *shapes):
    torch.manual_seed(0)
    return [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]


def forward_backward(fn, inputs, consts=()):
    """Output of fn(*inputs, *consts) and the gradient of a fixed random loss wrt every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs, *consts)
    torch.manual_seed(1)
    dy = torch.randn_like(out)
    return out, torch.autograd.grad(out, inputs, dy)


def assert_matches(fn, reference, inputs, consts, atol, rtol):
    out, grads = forward_backward(fn, inputs, consts)
    ref_out, ref_grads = forward_backward(reference, inputs, consts)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert g.dtype == ref_g.dtype
        torch.testing.assert_close(g, ref_g, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm(shape, device, dtype, atol, rtol):
    inputs = leaves(device, dtype, shape, shape[-1:])
    assert_matches(kernels.rmsnorm, kernels.rmsnorm_reference, inputs, (1e-6,), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_modulate(shape, device, dtype, atol, rtol):
    B, T, C = shape
    inputs = leaves(device, dtype, shape, (B, C), (B, C))
    assert_matches(kernels.rmsnorm_modulate, kernels.rmsnorm_modulate_reference, inputs, (1e-6,), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", [(2, 4, 8, 64), (3, 3, 5, 48), (2, 2, 75, 32)])  # (B, H, T, D)
def test_rope(shape, device, dtype, atol, rtol):
    B, H, T, D = shape
    (x,) = leaves(device, dtype, (B, T, H, D))
    angles = torch.rand(T, D // 2, device=device) * 6.3

    # q and k reach rope as (B, H, T, D) views of a (B, T, H, D) projection: strided input.
    def with_view(fn):
        return lambda x, cos, sin: fn(x.transpose(1, 2), cos, sin)

    assert_matches(with_view(kernels.rope), with_view(kernels.rope_reference), [x],
                   (angles.cos(), angles.sin()), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 1100)])  # the last is wider than one column tile
def test_swiglu(shape, device, dtype, atol, rtol):
    (h,) = leaves(device, dtype, shape[:-1] + (2 * shape[-1],))

    # gate and up reach swiglu as the two halves of one projection: row-strided views.
    def with_chunks(fn):
        return lambda h: fn(*h.chunk(2, dim=-1))

    assert_matches(with_chunks(kernels.swiglu), with_chunks(kernels.swiglu_reference), [h], (), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
def test_reductions_are_deterministic(device, dtype, atol, rtol):
    x, scale, shift, weight = leaves(device, dtype, (2, 75, 48), (2, 48), (2, 48), (48,))
    for fn, inputs in [(kernels.rmsnorm, [x, weight]), (kernels.rmsnorm_modulate, [x, scale, shift])]:
        first = forward_backward(fn, inputs)[1]
        again = forward_backward(fn, inputs)[1]
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
def test_ops_pass_opcheck(device, dtype, atol, rtol):
    # Schema, fake (meta) implementations and autograd registration, which torch.compile relies on.
    x, w, scale, shift, q, g, u = leaves(device, dtype, (3, 5, 48), (48,), (3, 48), (3, 48),
                                         (3, 2, 5, 16), (3, 5, 48), (3, 5, 48))
    cos, sin = torch.rand(2, 5, 8, device=device)
    for op, args in [
        (kernels._rmsnorm_op, (x, w, 1e-6)),
        (kernels._modulate_op, (x, scale, shift, 1e-6)),
        (kernels._rope_op, (q, cos, sin)),
        (kernels._swiglu_op, (g, u)),
    ]:
        torch.library.opcheck(op, args)
    # The backward ops have no autograd of their own: inputs that need no gradient.
    x, w, scale, q, g, u, dy = (t.detach() for t in (x, w, scale, q, g, u, torch.randn_like(x)))
    for op, args in [
        (kernels._rmsnorm_bwd_op, (dy, x, w, kernels._rmsnorm_op(x, w, 1e-6)[1])),
        (kernels._modulate_bwd_op, (dy, x, scale, kernels._modulate_op(x, scale, shift.detach(), 1e-6)[1])),
        (kernels._rope_bwd_op, (q, cos, sin)),
        (kernels._swiglu_bwd_op, (dy, g, u)),
    ]:
        torch.library.opcheck(op, args)


class TinyBlock(torch.nn.Module):
    """A pre-norm transformer block ending in an adaLN-modulated norm: every op, as the model uses it."""

    def __init__(self, use_triton, C=64, heads=2, F=96):
        super().__init__()
        self.use_triton, self.heads = use_triton, heads
        self.norm1 = torch.nn.Parameter(torch.ones(C))
        self.norm2 = torch.nn.Parameter(torch.ones(C))
        self.qkv = torch.nn.Linear(C, 3 * C, bias=False)
        self.proj = torch.nn.Linear(C, C, bias=False)
        self.up = torch.nn.Linear(C, 2 * F, bias=False)
        self.down = torch.nn.Linear(F, C, bias=False)
        self.ada = torch.nn.Linear(C, 2 * C, bias=False)

    def forward(self, x, cond, cos, sin):  # x (B, T, C), cond (B, C), cos/sin (T, D/2)
        B, T, C = x.shape
        k_on = self.use_triton
        h = self.qkv(kernels.rmsnorm(x, self.norm1, use_triton=k_on))
        q, k, v = h.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        q, k = kernels.rope(q, cos, sin, use_triton=k_on), kernels.rope(k, cos, sin, use_triton=k_on)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        gate, up = self.up(kernels.rmsnorm(x, self.norm2, use_triton=k_on)).chunk(2, dim=-1)
        x = x + self.down(kernels.swiglu(gate, up, use_triton=k_on))
        scale, shift = self.ada(cond).chunk(2, dim=-1)
        return kernels.rmsnorm_modulate(x, scale, shift, use_triton=k_on)


# A whole block compounds roundings, so it is compared tensor by tensor: ‖a − b‖ / ‖b‖. fp32:
# summation order only; bf16: a few roundings of 2^-9 each, on a few hundred elements per tensor.
BLOCK_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
def test_compiled_block_with_kernels(device, dtype, atol, rtol):
    """torch.compile(fullgraph=True) traces a block's forward and backward through every kernel
    (one graph, no break), and gives the same loss and gradients as eager kernels and as the
    reference. On CPU the aot_eager backend: it traces exactly what Inductor would get, without
    generating C++."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    on = TinyBlock(use_triton=True).to(device, dtype)
    off = TinyBlock(use_triton=False).to(device, dtype)
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 10, 64, device=device, dtype=dtype)
    cond = torch.randn(2, 64, device=device, dtype=dtype)
    angles = torch.rand(10, 16, device=device)
    args = (x, cond, angles.cos(), angles.sin())
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(on, backend=counter, fullgraph=True)

    def loss_and_grads(model):
        loss = model(*args).float().pow(2).sum()  # a sum keeps gradients O(1), well above rounding
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    results = loss_and_grads(compiled)
    assert counter.frame_count == 1
    for model in (on, off):
        for a, b in zip(results, loss_and_grads(model), strict=True):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err <= BLOCK_TOL[dtype], err


def test_dispatch_falls_back_to_reference(monkeypatch):
    x, w = torch.randn(2, 8, 64), torch.randn(64)
    assert kernels._use_triton("rmsnorm", True, x) == kernels.INTERPRET  # CPU: only in the interpreter
    assert not kernels._use_triton("rmsnorm", False, x)  # the model's kernels=False
    monkeypatch.setitem(kernels.USE, "rmsnorm", False)
    assert not kernels._use_triton("rmsnorm", True, x)  # an op that lost to torch.compile
    monkeypatch.setitem(kernels.USE, "rmsnorm", True)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not kernels._use_triton("rmsnorm", True, x)

    def no_kernel(*args):
        raise AssertionError("the Triton op must not run without triton")

    monkeypatch.setattr(kernels, "_rmsnorm_op", no_kernel)
    assert torch.equal(kernels.rmsnorm(x, w), kernels.rmsnorm_reference(x, w))


def test_imports_and_runs_without_triton():
    # A CPU install may lack triton: importing kernels must not need it, and every op falls back.
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, kernels
assert not kernels.HAS_TRITON
x, w, s = torch.randn(2, 8, 64), torch.randn(64), torch.randn(2, 64)
cos, sin = torch.randn(2, 8, 32)
assert torch.equal(kernels.rmsnorm(x, w), kernels.rmsnorm_reference(x, w))
assert torch.equal(kernels.rmsnorm_modulate(x, s, s), kernels.rmsnorm_modulate_reference(x, s, s))
assert torch.equal(kernels.rope(x[:, None], cos, sin), kernels.rope_reference(x[:, None], cos, sin))
assert torch.equal(kernels.swiglu(x, x), kernels.swiglu_reference(x, x))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)



def test_model_with_kernels_equals_model_without(monkeypatch):
    """The whole model, kernels on (interpreted Triton on CPU) vs off: same loss and gradients in fp32."""
    import synth
    from model import UMM, UMMConfig, collate

    tok = synth.get_tokenizer("tiny")
    samples = [synth.make_sample("tiny", task, "train", i) for i, task in enumerate(synth.TASKS)]
    used, real = [], kernels._use_triton
    monkeypatch.setattr(kernels, "_use_triton", lambda *a: used.append(real(*a)) or used[-1])
    losses, grads = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = UMM(UMMConfig.preset("tiny", width=64, vocab_size=tok.get_vocab_size(), kernels=fused))
        for p in model.parameters():  # DiT's zero-init head would hide the adaLN path: wake it up
            p.data.add_(torch.randn_like(p) * 0.02)
        batch = collate(samples, model.cfg, tok)
        torch.manual_seed(1)
        loss, _ = model.loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert any(used) and not all(used)  # the fused run really ran Triton, the other did not
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(*grads):  # fp32, same math in a different order: 1e-4 relative to the largest entry
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7
