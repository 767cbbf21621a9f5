"""
Triton kernels against their torch references (model.py's ops): the output and every gradient.

    python -m pytest -q tests/test_kernels.py

Without CUDA the kernels run in Triton's interpreter, which has no bf16 arithmetic: the checks run
in fp32, plus the mixed fp32/bf16 inputs of a training step, which the kernels only load and store
in bf16; tests/conftest.py sets TRITON_INTERPRET=1 before kernels is imported. With CUDA the same
checks run compiled on the GPU in fp32 and bf16, and the CPU cases are skipped. Compiling for the
GPU needs no GPU: the kernels are also built for sm_90 here and checked for register spills.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
import model as M
import synth
from model import UMM, UMMConfig, collate

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
    assert_matches(kernels.rmsnorm, M.rmsnorm, inputs, (1e-6,), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_modulate(shape, device, dtype, atol, rtol):
    B, T, C = shape
    inputs = leaves(device, dtype, shape, (B, C), (B, C))
    assert_matches(kernels.rmsnorm_modulate, M.rmsnorm_modulate, inputs, (1e-6,), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", [(2, 4, 8, 64), (3, 3, 5, 48), (2, 2, 75, 32)])  # (B, H, T, D)
def test_rope(shape, device, dtype, atol, rtol):
    B, H, T, D = shape
    (x,) = leaves(device, dtype, (B, T, H, D))
    angles = torch.rand(T, D // 2, device=device) * 6.3

    # q and k reach rope as (B, H, T, D) views of a (B, T, H, D) projection: strided input.
    def with_view(fn):
        return lambda x, cos, sin: fn(x.transpose(1, 2), cos, sin)

    assert_matches(with_view(kernels.rope), with_view(M.rope), [x],
                   (angles.cos(), angles.sin()), atol, rtol)


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 1100)])  # the last is wider than one column tile
def test_swiglu(shape, device, dtype, atol, rtol):
    (h,) = leaves(device, dtype, shape[:-1] + (2 * shape[-1],))

    # gate and up reach swiglu as the two halves of one projection: row-strided views.
    def with_chunks(fn):
        return lambda h: fn(*h.chunk(2, dim=-1))

    assert_matches(with_chunks(kernels.swiglu), with_chunks(M.swiglu), [h], (), atol, rtol)


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
        self.ops = kernels if use_triton else M  # the same four functions, Triton or torch
        self.heads = heads
        self.norm1 = torch.nn.Parameter(torch.ones(C))
        self.norm2 = torch.nn.Parameter(torch.ones(C))
        self.qkv = torch.nn.Linear(C, 3 * C, bias=False)
        self.proj = torch.nn.Linear(C, C, bias=False)
        self.up = torch.nn.Linear(C, 2 * F, bias=False)
        self.down = torch.nn.Linear(F, C, bias=False)
        self.ada = torch.nn.Linear(C, 2 * C, bias=False)

    def forward(self, x, cond, cos, sin):  # x (B, T, C), cond (B, C), cos/sin (T, D/2)
        B, T, C = x.shape
        ops = self.ops
        h = self.qkv(ops.rmsnorm(x, self.norm1))
        q, k, v = h.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        gate, up = self.up(ops.rmsnorm(x, self.norm2)).chunk(2, dim=-1)
        x = x + self.down(ops.swiglu(gate, up))
        scale, shift = self.ada(cond).chunk(2, dim=-1)
        return ops.rmsnorm_modulate(x, scale, shift)


# A whole block compounds roundings, so it is compared tensor by tensor: ‖a − b‖ / ‖b‖. fp32:
# summation order only; bf16: a few roundings of 2^-9 each, on a few hundred elements per tensor.
BLOCK_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device,dtype,atol,rtol", CASES)
def test_compiled_block_with_kernels(device, dtype, atol, rtol):
    """torch.compile(fullgraph=True) traces a block's forward and backward through every kernel
    (one graph, no break), and gives the same loss and gradients as eager kernels and as the
    reference. Inductor on CPU too: the lowering a GPU run gets around the custom ops (planned from
    their fake implementations), with C++ in place of Triton for the rest of the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    on = TinyBlock(use_triton=True).to(device, dtype)
    off = TinyBlock(use_triton=False).to(device, dtype)
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 10, 64, device=device, dtype=dtype)
    cond = torch.randn(2, 64, device=device, dtype=dtype)
    angles = torch.rand(10, 16, device=device)
    args = (x, cond, angles.cos(), angles.sin())
    counter = CompileCounterWithBackend("inductor")
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
    x = torch.randn(2, 8, 64)
    norm, fused_norm = M.RMSNorm(64, fused=False), M.RMSNorm(64, fused=True)
    assert kernels.can_run("rmsnorm", x) == kernels.INTERPRET  # CPU: only in the interpreter
    monkeypatch.setitem(kernels.USE, "rmsnorm", False)
    assert not kernels.can_run("rmsnorm", x)  # an op that lost to torch.compile
    monkeypatch.setitem(kernels.USE, "rmsnorm", True)

    def no_kernel(*args):
        raise AssertionError("the Triton op must not run here")

    monkeypatch.setattr(kernels, "_rmsnorm_op", no_kernel)
    assert torch.equal(norm(x), M.rmsnorm(x, norm.weight))  # the model's kernels=False
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not kernels.can_run("rmsnorm", x)
    assert torch.equal(fused_norm(x), M.rmsnorm(x, fused_norm.weight))  # kernels=True, no triton


def test_imports_and_runs_without_triton():
    # A CPU install may lack triton: importing kernels must not need it, and every op falls back:
    # blocks with kernels on compute exactly what blocks with kernels off do.
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, kernels, model
assert not kernels.HAS_TRITON
x, c = torch.randn(2, 8, 64), torch.randn(2, 64)
cos, sin = torch.randn(2, 8, 32)
outs = []
for fused in (False, True):  # a block with RMSNorm, RoPE and SwiGLU, then an adaLN block
    torch.manual_seed(0)
    cfg = model.UMMConfig(width=64, kernels=fused)
    block, head = model.Block(cfg), model.AdaLNBlock(cfg)
    outs.append(head(block(x, cos=cos, sin=sin), c))
assert torch.equal(*outs)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def one_sample_per_task(world):
    return [synth.make_sample(world, task, "train", i) for i, task in enumerate(synth.TASKS)]


@pytest.fixture
def triton_used(monkeypatch):
    """The list of dispatch decisions (True: the Triton kernel ran) of the ops that a model with
    kernels on called during a test (a model with kernels off asks for none)."""
    used, real = [], kernels.can_run
    monkeypatch.setattr(kernels, "can_run", lambda *a: used.append(real(*a)) or used[-1])
    return used


def test_model_with_kernels_equals_model_without(triton_used):
    """The whole model, kernels on (interpreted Triton on CPU) vs off: same loss and gradients in fp32."""
    tok = synth.get_tokenizer("tiny")
    samples = one_sample_per_task("tiny")
    losses, grads, decisions = [], [], []
    for fused in (False, True):
        triton_used.clear()
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
        decisions.append(list(triton_used))
    assert any(decisions[1]) and not any(decisions[0])  # the fused run really ran Triton, the other did not
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(*grads):  # fp32, same math in a different order: 1e-4 relative to the largest entry
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
def test_training_step_with_kernels_compiles_to_one_graph(device, triton_used):
    """torch.compile(fullgraph=True) of the model's training loss with every kernel on, forward and
    backward: one graph, no break (a break is also the host waiting for the GPU mid-step). Dynamo
    finds breaks whatever the backend, so the CPU uses aot_eager; CUDA uses Inductor under bf16
    autocast, as train.py runs."""
    import contextlib

    from torch._dynamo.testing import CompileCounterWithBackend

    tok = synth.get_tokenizer("tiny")
    samples = one_sample_per_task("tiny")
    torch.manual_seed(0)
    model = UMM(UMMConfig.preset("tiny", width=64, vocab_size=tok.get_vocab_size(), kernels=True)).to(device)
    batch = {task: {k: v.to(device) for k, v in sub.items()} for task, sub in collate(samples, model.cfg, tok).items()}
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    with amp:
        loss, parts = torch.compile(model, backend=counter, fullgraph=True)(batch)
    loss.backward()
    assert counter.frame_count == 1 and triton_used and all(triton_used)  # one graph, around every kernel
    assert torch.isfinite(loss) and {"ce", "flow", "flow_t0"} <= parts.keys()


def kernel_calls(preset):
    """{(op, ((dtype, last dim), ...))}: the distinct calls of the four ops (model.py's torch versions, which
    kernels.py's replace) in one bf16-autocast training step of a preset's widths (one block per stack: the
    depth changes how often each call is made, not its inputs). CPU autocast casts linear layers to bf16 and
    leaves the residual stream in fp32, as CUDA's does."""
    import train

    world = train.PRESETS[preset]["world"]
    tok = synth.get_tokenizer(world)
    cfg = UMMConfig.preset(preset, vocab_size=tok.get_vocab_size(), depth=1, enc_depth=1, head_depth=1)
    calls = set()

    def recorded(op):
        fn = getattr(M, op)

        def call(*args, **kwargs):
            calls.add((op, tuple((a.dtype, a.shape[-1]) for a in args if isinstance(a, torch.Tensor))))
            return fn(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for op in kernels.USE:
            mp.setattr(M, op, recorded(op))
        samples = one_sample_per_task(world)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = UMM(cfg).loss(collate(samples, cfg, tok))
        loss.backward()
    return calls


@pytest.mark.parametrize("preset", ["small", "base"])
def test_benchmark_cases_are_what_training_runs(preset):
    # python kernels.py decides which kernels stay on: it must time the dtypes and widths a training
    # step really passes (fp32 norms of the residual stream, bf16 rope and SwiGLU), not guessed ones.
    import train

    assert kernels.preset_shapes()[preset]["B"] == train.PRESETS[preset]["micro_batch"]
    shape = dict(kernels.preset_shapes()[preset], B=2, T=5)
    benched = {(op, tuple((a.dtype, a.shape[-1]) for a in args if isinstance(a, torch.Tensor)))
               for op, _, _, args, _ in kernels._bench_cases(**shape, device="cpu")}
    assert kernel_calls(preset) == benched


# Each result is rounded once to its own dtype: fp32 results differ by summation order, bf16 ones by an ulp.
RESULT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
def test_kernels_in_training_dtypes(device):
    """Each op on the benchmark's inputs (the mixed dtypes of a training step, row-strided SwiGLU halves)
    at small odd sizes: the fused op equals its reference, output and every gradient. The interpreter
    loads and stores bf16; the kernels' arithmetic is fp32, which it has."""
    torch.manual_seed(0)
    for op, reference, fused, args, _ in kernels._bench_cases(B=2, T=7, C=48, head_dim=16, F=40, T_head=6,
                                                             device=device):
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        dy = torch.randn_like(reference(*args))
        results = []
        for fn in (fused, reference):
            out = fn(*args)
            results.append([out, *torch.autograd.grad(out, inputs, dy)])
        for a, b in zip(*results, strict=True):
            assert a.dtype == b.dtype, op
            tol = RESULT_TOL[b.dtype]
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{op}: {m}")


def hopper_resources(arch=90):
    """Compile each kernel launch of the benchmark cases (both presets' dtypes and block sizes) for
    sm_<arch> exactly as a launch on that GPU would, and read each binary's registers per thread and
    local-memory (spill) bytes from cuobjdump. Needs no GPU: Triton's compiler, ptxas and cuobjdump ship
    in the triton wheel. Run it without TRITON_INTERPRET, in which Triton builds no GPU code at all."""
    import inspect
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
    launches = {}

    class Recorder:  # stands in for a kernel: kernel[grid](*args, **constexprs) is recorded, not run
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                names = inspect.signature(self.kernel.fn).parameters
                sig = {name: pointer[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float)
                       else "i32" for name, a in zip(names, args)} | dict.fromkeys(constexprs, "constexpr")
                key = (preset, self.kernel.fn.__name__, repr(sig), repr(constexprs))
                launches[key] = (self.kernel, sig, constexprs)
            return launch

    for name, value in list(vars(kernels).items()):
        if isinstance(value, JITFunction):
            setattr(kernels, name, Recorder(value))
    for preset, shape in kernels.preset_shapes().items():  # Recorder reads `preset` while it launches
        for _, _, fused, args, _ in kernels._bench_cases(**dict(shape, B=2), device="cpu"):
            kernels._fwd_bwd(fused, args)()
    rows = []
    for (preset, name, _, _), (kernel, sig, constexprs) in launches.items():
        binary = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(binary.asm["cubin"])
            f.flush()
            usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function")[-1]))  # REG:155 STACK:0 ... LOCAL:0
        rows.append(dict(preset=preset, kernel=name, blocks=constexprs, registers=int(fields["REG"]),
                         stack=int(fields["STACK"]), local=int(fields["LOCAL"])))
    return rows


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """The interpreter checks each kernel's math, not that the GPU compiler accepts it: every launch the
    benchmark makes must also compile for the H100/H200 (sm_90) in its training dtypes, and ptxas must keep
    it in registers, since a spill to local memory adds traffic to a kernel whose whole cost is traffic."""
    code = "import json, test_kernels; print(json.dumps(test_kernels.hopper_resources()))"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout.splitlines()[-1])
    every_kernel = {name for name in vars(kernels) if name.startswith("_") and name.endswith("_kernel")}
    assert {r["kernel"] for r in rows} == every_kernel and {r["preset"] for r in rows} == {"small", "base"}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["local"] == r["stack"] == 0, r
