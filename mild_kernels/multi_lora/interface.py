"""The public ``multi_lora_linear``: argument checks and backend choice."""

from __future__ import annotations

import math

import torch

from .._backends import check_backend, choose_backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from .._runtime import autocast_inputs, autocast_off
from .op import checked_ids, multi_lora_forward

BACKENDS = ("triton", "torch")  # offered (_backends.py holds the policy)
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# The triton kernels keep the shrink tile (BLOCK_M x rank, fp32) in registers: at rank 128
# every candidate config spilled on sm_80 or sm_90 (tests/compile_gate.py), so larger ranks
# take the torch backend. They index with int32 offsets.
MAX_RANK = 64
MAX_ELEMENTS = 2**31 - 1


def _check_shapes(x, weight, bias, lora_a, lora_b, adapter_ids, scaling, backend):
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_tensor("x", x, ndims=(2, 3), dtypes=dtypes)
    check_tensor("weight", weight, ndims=(2,))
    check_tensor("lora_a", lora_a, ndims=(3,))
    check_tensor("lora_b", lora_b, ndims=(3,))
    check_tensor("adapter_ids", adapter_ids, ndims=(1,), dtypes=INTEGER_DTYPES)
    named = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        named["bias"] = check_tensor("bias", bias, ndims=(1,))
    for name, t in named.items():
        require(t.dtype == x.dtype, f"{name}: dtype {t.dtype} must match x's dtype {x.dtype}")
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    num_adapters, rank = lora_a.shape[:2]
    require(weight.shape[1] == in_features,
            f"weight: shape {tuple(weight.shape)} must be (out_features, {in_features}), x's last dim being "
            f"{in_features}")
    require(bias is None or tuple(bias.shape) == (out_features,),
            f"bias: shape {tuple(bias.shape) if bias is not None else None} must be ({out_features},)")
    require(num_adapters >= 1 and rank >= 1, f"lora_a: shape {tuple(lora_a.shape)} needs at least one adapter "
                                             "and rank >= 1")
    require(lora_a.shape[2] == in_features,
            f"lora_a: shape {tuple(lora_a.shape)} must be (adapters, rank, {in_features}), x's last dim being "
            f"{in_features}")
    require(lora_b.shape[0] == num_adapters,
            f"lora_b: holds {lora_b.shape[0]} adapters but lora_a holds {num_adapters}")
    require(lora_b.shape[2] == rank, f"lora_b: rank {lora_b.shape[2]} (its last dim) must equal lora_a's rank {rank}")
    require(lora_b.shape[1] == out_features,
            f"lora_b: shape {tuple(lora_b.shape)} must be (adapters, {out_features}, rank), weight having "
            f"{out_features} output features")
    require(adapter_ids.shape[0] == x.shape[0],
            f"adapter_ids: length {adapter_ids.shape[0]} must equal x's rows {x.shape[0]} (one id per row)")
    if isinstance(scaling, torch.Tensor):
        check_tensor("scaling", scaling, ndims=(1,))
        require(scaling.is_floating_point(), f"scaling: must be a float tensor, got {scaling.dtype}")
        require(scaling.shape[0] == num_adapters,
                f"scaling: shape {tuple(scaling.shape)} must be ({num_adapters},), one scale per adapter")
    else:
        require(isinstance(scaling, (int, float)) and not isinstance(scaling, bool),
                f"scaling: expected a float or a ({num_adapters},) tensor, got {type(scaling).__name__}")
        require(math.isfinite(scaling), f"scaling: must be finite, got {scaling}")
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                      scaling=scaling if isinstance(scaling, torch.Tensor) else None)
    require(adapter_ids.device == x.device or adapter_ids.device.type == "cpu",
            f"adapter_ids: is on {adapter_ids.device}; it must be on x's device {x.device} or on the CPU")


def triton_refusal(x: torch.Tensor, rank: int, out_features: int) -> str | None:
    """Why the Triton kernels cannot take this call (None: they can)."""
    elements = x.numel() // max(1, x.shape[-1]) * max(x.shape[-1], out_features)
    if rank > MAX_RANK:
        return f"lora_a: rank {rank} exceeds the triton backend's maximum {MAX_RANK}; use backend='torch'"
    if elements > MAX_ELEMENTS:
        return (f"x: {elements} elements in x or the output exceed the triton backend's int32 indexing "
                f"({MAX_ELEMENTS}); use backend='torch'")
    return None


def multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, scaling=1.0, backend="auto"):
    """A linear layer whose rows each use their own LoRA adapter (docs/semantics.md).

    ``y[i] = x[i] W^T + bias + scaling[id_i] (x[i] A[id_i]^T) B[id_i]^T``; id -1 means no adapter.

    Args:
        x: (rows, tokens, in) or (rows, in); fp16, bf16 or fp32 (float64 on the torch backend).
        weight: (out, in) and bias: (out,) or None: the base layer, in x's dtype.
        lora_a: (adapters, rank, in); lora_b: (adapters, out, rank); x's dtype.
        adapter_ids: (rows,) integers in [-1, adapters): each row's adapter; a tensor on x's
            device or on the CPU (checked there without waiting for the GPU), or a list.
        scaling: a float, or an (adapters,) float tensor with one scale per adapter.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1; rank <= 64: one fused kernel),
            "torch" (batched matmuls over rows, any device) or "auto" (triton on CUDA when it
            applies, else torch).

    Differentiable in x, lora_a and lora_b (and in weight and bias, should they require
    grad; scaling gets no gradient). Registered as ``torch.ops.mild_kernels.multi_lora_forward``,
    so torch.compile traces it whole.

    Returns:
        (rows, tokens, out) or (rows, out), in x's dtype.
    """
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    with autocast_off(x):
        return _multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, scaling, backend)


def _multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, scaling, backend):
    check_backend(backend, BACKENDS)
    if isinstance(adapter_ids, (list, tuple)):
        adapter_ids = torch.tensor(adapter_ids, dtype=torch.long)
    _check_shapes(x, weight, bias, lora_a, lora_b, adapter_ids, scaling, backend)
    chosen = choose_backend(backend, x.device, offered=BACKENDS,
                            triton_refusal=triton_refusal(x, lora_a.shape[1], weight.shape[0]))
    if isinstance(scaling, torch.Tensor):
        scale, scales = 1.0, scaling.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    else:
        scale, scales = float(scaling), None
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        adapter_ids = adapter_ids.long()
    x3 = x if x.dim() == 3 else x[:, None]
    if x3.numel() == 0 or weight.numel() == 0:  # a zero-size dim: nothing for a kernel to do
        ids = checked_ids(adapter_ids, lora_a.shape[0], x.device)
        y = _empty_problem(x3, weight, bias, lora_a, lora_b, ids, scale, scales)
        return y if x.dim() == 3 else y[:, 0]
    save_shrink = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b))
    bias = bias.contiguous() if bias is not None else None
    y, _ = multi_lora_forward(x3, weight, bias, lora_a, lora_b, adapter_ids.contiguous(), scale, scales, chosen,
                              save_shrink)
    return y if x.dim() == 3 else y[:, 0]


def _empty_problem(x3, weight, bias, lora_a, lora_b, adapter_ids, scale, scales):
    """The layer in plain, differentiable torch ops when rows, tokens, in or out features are 0."""
    ids = adapter_ids.long()  # on x's device already (checked_ids)
    used = ids.clamp(min=0)
    row_scale = (ids >= 0).to(x3.dtype) * (scale if scales is None else scales.to(x3.device, x3.dtype)[used])
    shrink = torch.einsum("bti,bri->btr", x3, lora_a[used])
    lora = torch.einsum("btr,bor->bto", shrink, lora_b[used]) * row_scale[:, None, None]
    return torch.nn.functional.linear(x3, weight, bias) + lora
