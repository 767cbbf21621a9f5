"""
Triton chooses interpreter-or-GPU when it decorates a kernel, i.e. when kernels.py is imported.
Without CUDA the kernel tests (and the model's kernels-on test) need the interpreter, so it must
be switched on before any test module imports kernels or model, whatever order pytest uses.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
