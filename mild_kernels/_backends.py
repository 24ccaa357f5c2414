"""The one backend policy of every op (sma_attention, multi_lora_linear, FusedStep, composite_layers).

- "auto": the Triton kernel on CUDA tensors (not under the interpreter, and only for a call
  the kernel takes); else the CUDA C++ library, for an op that has one and where it loads;
  else torch, which runs anywhere.
- An explicit choice runs or fails: a backend the op does not have, or one that cannot run
  this call here, is a ValueError that says why. Nothing falls back silently.
"""

from __future__ import annotations

import torch

from . import cuda_lib
from ._checks import require
from ._runtime import interpreting, triton_available, triton_runs_on

BACKENDS = ("auto", "triton", "cuda", "torch")


def check_backend(backend: str, offered: tuple = BACKENDS) -> str:
    """``backend`` if it is "auto" or one of the op's ``offered`` backends, else a ValueError."""
    choices = ("auto",) + tuple(b for b in offered if b != "auto")
    require(backend in choices, f"backend: must be one of {choices}, got {backend!r}")
    return backend


def choose_backend(backend: str, device: torch.device, *, offered: tuple = ("triton", "cuda", "torch"),
                   triton_refusal: str | None = None) -> str:
    """The backend that runs a call on ``device``, by the policy above.

    offered: the op's backends. triton_refusal: why the Triton kernel cannot take this call
    (its shapes are past what it supports), or None when it can; "auto" then takes the next
    backend, and an explicit "triton" raises it.
    """
    check_backend(backend, offered)
    if backend == "auto":
        if ("triton" in offered and device.type == "cuda" and triton_available() and not interpreting()
                and triton_refusal is None):
            return "triton"
        if "cuda" in offered and cuda_lib.unavailable_reason(device) is None:
            return "cuda"
        return "torch"
    if backend == "triton":
        require(triton_available(), "backend: 'triton' needs the triton package")
        require(triton_runs_on(device),
                f"backend: 'triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got {device}")
        require(triton_refusal is None, triton_refusal or "")
    if backend == "cuda":
        cuda_lib.library(device)
    return backend
