"""Multi-adapter LoRA as torch.library custom ops: forward, backward, fake kernels, autograd.

The public wrapper (interface.py) checks shapes and dtypes and calls
``torch.ops.mild_kernels.multi_lora_forward``. The adapter-id range check looks at
values, so it runs inside the op: ``torch.compile(fullgraph=True)`` traces callers
without graph breaks.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .._checks import require
from .torch_lora import multi_lora_backward_torch, multi_lora_forward_torch

NO_TENSOR = torch.empty(0)  # stands for an absent optional output

# Id tensors already found in range: {id(tensor): (weakref, version, lowest id, highest id)}.
# Reading a CUDA tensor's range waits for the GPU; the module path sets ids once for
# every projection of a UNet call, so each tensor is read at most once while unchanged.
_known_id_ranges: dict[int, tuple] = {}


def remember_id_range(ids: Tensor, low: int, high: int) -> None:
    """Record the range of ``ids`` (known to the caller without reading the device)."""
    if ids.is_inference():  # inference tensors keep no version counter
        return
    key = id(ids)
    _known_id_ranges[key] = (weakref.ref(ids, lambda _: _known_id_ranges.pop(key, None)), ids._version, low, high)


def _id_range(ids: Tensor) -> tuple[int, int]:
    entry = _known_id_ranges.get(id(ids))
    if entry is not None and entry[0]() is ids and entry[1] == ids._version:
        return entry[2], entry[3]
    low, high = (int(v) for v in torch.aminmax(ids.long()))
    remember_id_range(ids, low, high)
    return low, high


def checked_ids(ids: Tensor, num_adapters: int, device: torch.device) -> Tensor:
    """``ids`` on ``device``, after checking their range (on the host when they come from the CPU)."""
    if ids.numel():
        low, high = _id_range(ids)
        require(low >= -1 and high < num_adapters,
                f"adapter_ids: ids must lie in [-1, {num_adapters - 1}] for {num_adapters} adapters (-1 means no "
                f"adapter); got values from {low} to {high}")
    if ids.device == device:
        return ids
    moved = ids.to(device, non_blocking=True)
    if ids.numel():
        remember_id_range(moved, low, high)
    return moved


@torch.library.custom_op("mild_kernels::multi_lora_forward", mutates_args=())
def multi_lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                       adapter_ids: Tensor, scale: float, scales: Optional[Tensor], backend: str,
                       save_shrink: bool) -> tuple[Tensor, Tensor]:
    """(y (rows, T, N), the per-row shrink x A[id]^T (rows * T, r) fp32 or an empty tensor).

    x is (rows, T, K). The triton backend stores the shrink when ``save_shrink``, for the
    backward pass; the torch backend recomputes it there.
    """
    adapter_ids = checked_ids(adapter_ids, lora_a.shape[0], x.device)
    rows, tokens, K = x.shape
    if backend == "torch":
        return multi_lora_forward_torch(x, weight, bias, lora_a, lora_b, adapter_ids, scale, scales), \
            NO_TENSOR.to(x.device)
    from .triton_lora import multi_lora_forward_triton

    y, shrink = multi_lora_forward_triton(x.reshape(rows * tokens, K), weight, bias, lora_a, lora_b, adapter_ids,
                                          tokens, scale, scales, save_shrink)
    return y.view(rows, tokens, -1), (shrink if shrink is not None else NO_TENSOR.to(x.device))


def _stores_shrink(backend: str, save_shrink: bool) -> bool:
    return backend == "triton" and save_shrink


@multi_lora_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, adapter_ids, scale, scales, backend, save_shrink):
    rows, tokens, _ = x.shape
    shrink_shape = (rows * tokens, lora_a.shape[1]) if _stores_shrink(backend, save_shrink) else (0,)
    return x.new_empty((rows, tokens, weight.shape[0])), x.new_empty(shrink_shape, dtype=torch.float32)


@torch.library.custom_op("mild_kernels::multi_lora_backward", mutates_args=())
def multi_lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                        adapter_ids: Tensor, scale: float, scales: Optional[Tensor], shrink: Tensor,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for x (rows, T, K) and grad_y (rows, T, N)."""
    adapter_ids = checked_ids(adapter_ids, lora_a.shape[0], x.device)
    if backend == "torch":
        return multi_lora_backward_torch(grad_y, x, weight, lora_a, lora_b, adapter_ids, scale, scales)
    from .triton_lora import multi_lora_backward_triton

    rows, tokens, K = x.shape
    dx, d_a, d_b = multi_lora_backward_triton(grad_y.reshape(rows * tokens, -1), x.reshape(rows * tokens, K),
                                              weight, lora_a, lora_b, adapter_ids, tokens, scale, scales, shrink)
    return dx.view(x.shape), d_a, d_b


@multi_lora_backward.register_fake
def _(grad_y, x, weight, lora_a, lora_b, adapter_ids, scale, scales, shrink, backend):
    return x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, adapter_ids, scale, scales, backend, save_shrink = inputs
    _, shrink = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_ids, scales, shrink)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_y, _grad_shrink):
    x, weight, lora_a, lora_b, adapter_ids, scales, shrink = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    dx, d_a, d_b = torch.ops.mild_kernels.multi_lora_backward(grad_y, x, weight, lora_a, lora_b, adapter_ids,
                                                              ctx.scale, scales, shrink, ctx.backend)
    # The base layer is normally frozen; a weight or bias that asks for a gradient still gets it.
    d_weight = grad_y.flatten(0, 1).T @ x.flatten(0, 1) if ctx.needs_input_grad[1] else None
    d_bias = grad_y.sum((0, 1)) if ctx.needs_input_grad[2] else None
    return dx, d_weight, d_bias, d_a, d_b, None, None, None, None, None


torch.library.register_autograd("mild_kernels::multi_lora_forward", _backward, setup_context=_setup_context)
