"""Backend choice for the ops that have Triton, CUDA C++ and torch implementations."""

from __future__ import annotations

import torch

from . import cuda_lib
from ._checks import require
from ._runtime import interpreting, triton_available, triton_runs_on

BACKENDS = ("auto", "triton", "cuda", "torch")


def check_backend(backend: str) -> str:
    require(backend in BACKENDS, f"backend: must be one of {BACKENDS}, got {backend!r}")
    return backend


def choose_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "auto" takes Triton, else the CUDA library, on CUDA
    tensors and torch elsewhere; an explicit choice that cannot run here is a ValueError."""
    if backend == "auto":
        if device.type == "cuda" and triton_available() and not interpreting():
            return "triton"
        if cuda_lib.unavailable_reason(device) is None:
            return "cuda"
        return "torch"
    if backend == "triton":
        require(triton_available(), "backend: 'triton' needs the triton package")
        require(triton_runs_on(device),
                f"backend: 'triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got {device}")
    if backend == "cuda":
        cuda_lib.library(device)
    return backend
