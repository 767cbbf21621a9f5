"""Shared test setup.

Triton chooses interpreter-or-GPU when it decorates a kernel, i.e. when kernels.py is imported.
Without CUDA the kernel tests (and the model's kernels-on test) need the interpreter, so it must
be switched on before any test module imports kernels or model, whatever order pytest uses.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Batches in the eval and sample tests are tiny, and on a shared 2-core machine a second thread that
    waits for a busy core makes every op up to 100x slower; one thread is as fast when the machine is quiet."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder holding one checkpoint of a narrow model after 2 steps, shared by the tests that load one."""
    import train
    out = tmp_path_factory.mktemp("run")
    train.train(train.parse_args(["--device=cpu", "--width=64", "--batch_size=8", "--micro_batch=8", "--max_steps=2",
                                  "--eval_every=0", "--save_every=2", f"--out_dir={out}"]))
    return str(out / "pretrain")
