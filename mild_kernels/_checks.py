"""Argument checks shared by the public wrappers.

Every failure is a ValueError whose message starts with the argument's name, so
a bad call fails in Python with a sentence, never inside a kernel.
"""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(name: str, value, *, ndims: Iterable[int] | None = None, dtypes=None) -> torch.Tensor:
    require(isinstance(value, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndims is not None:
        ndims = tuple(ndims)
        require(value.dim() in ndims, f"{name}: expected {' or '.join(map(str, ndims))} dims, got shape {tuple(value.shape)}")
    if dtypes is not None:
        require(value.dtype in dtypes, f"{name}: dtype {value.dtype} is not supported; use one of {list(dtypes)}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    named = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in named.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        require(device == first, f"{name}: is on {device} but {first_name} is on {first}; all tensors must share one device")
    return first


def check_finite(name: str, value: torch.Tensor, bound: float | None = None) -> None:
    require(bool(torch.isfinite(value).all()), f"{name}: must be finite (use `allow` to block pairs, not -inf)")
    if bound is not None and value.numel():
        largest = float(value.abs().max())
        require(largest <= bound, f"{name}: entries must lie in [-{bound:g}, {bound:g}], got {largest:g}")
