"""The public ``sma_attention``: argument checks, regions to a layout, and backend choice."""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch

from .._backends import check_backend, choose_backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from .._runtime import autocast_inputs, autocast_off, unit_last_stride
from .layout import SMALayout, prepare_regions, tokens_of
from .op import flatten_layout, sma_forward

BACKENDS = ("triton", "torch")  # offered (_backends.py holds the policy)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


class SMAOutput(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor | None
    region_mass: torch.Tensor | None


def _check_qkv(q, k, v, backend):
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndims=(4,), dtypes=dtypes)
    require(k.dtype == q.dtype and v.dtype == q.dtype, f"k, v: dtypes {k.dtype}, {v.dtype} must match q's {q.dtype}")
    B, H, _, D = q.shape
    require(k.shape[:2] == (B, H), f"k: shape {tuple(k.shape)} must share (B, H) = {(B, H)} with q")
    require(v.shape[:3] == k.shape[:3], f"v: shape {tuple(v.shape)} must match k's (B, H, Nk) = {tuple(k.shape[:3])}")
    require(k.shape[3] == D and v.shape[3] == D, f"k, v: head dims {k.shape[3]}, {v.shape[3]} must equal q's {D}")
    require(MIN_HEAD_DIM <= D <= MAX_HEAD_DIM, f"q: head dim {D} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    require(q.shape[2] > 0 and k.shape[2] > 0, "q, k: need at least one query and one key token")
    require(q.device == k.device == v.device, f"k, v: are on {k.device}, {v.device} but q is on {q.device}; all "
            "tensors must share one device")


def _check_bias(bias, batch, heads, num_regions, device):
    if bias is None:
        return None
    check_tensor("bias", bias, ndims=(2, 3, 4))
    require(bias.is_floating_point(), f"bias: must be a float tensor, got {bias.dtype}")
    require(bias.device == device, f"bias: is on {bias.device} but q is on {device}; all tensors must share one device")
    R = num_regions
    shapes = {2: (R, R), 3: (heads, R, R), 4: (batch, heads, R, R)}
    require(tuple(bias.shape) == shapes[bias.dim()],
            f"bias: shape {tuple(bias.shape)} must be (R, R), (H, R, R) or (B, H, R, R) with R={R}, H={heads}, B={batch}")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return unit_last_stride(bias)


# Layouts whose parts were found consistent, by id (held, so an id is not reused): a layout is
# immutable, and SMALayout.check costs ~25-50 us, which ~70 attention calls per SDXL UNet call
# would pay on the host each step. Compiled callers trace the check once instead.
_consistent_layouts: collections.OrderedDict = collections.OrderedDict()
MAX_REMEMBERED_LAYOUTS = 256


def _check_layout_parts(layout: SMALayout) -> None:
    if torch.compiler.is_compiling():
        layout.check()
        return
    if _consistent_layouts.get(id(layout)) is layout:
        return
    layout.check()
    _consistent_layouts[id(layout)] = layout
    if len(_consistent_layouts) > MAX_REMEMBERED_LAYOUTS:
        _consistent_layouts.popitem(last=False)


def _check_layout(layout, q, k, caller_given: bool = True):
    require(isinstance(layout, SMALayout), f"layout: expected an SMALayout from prepare_regions, got "
            f"{type(layout).__name__}")
    if caller_given:  # one prepared here is consistent by construction
        _check_layout_parts(layout)
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    require(layout.q_tokens == Nq and layout.k_tokens == Nk,
            f"layout: prepared for {layout.q_tokens} query and {layout.k_tokens} key tokens, the attention has "
            f"{Nq} and {Nk}")
    require(layout.batch in (1, B), f"layout: prepared for batch {layout.batch} (its labels, allow table or tile "
            f"lists), the attention has B={B}")
    device = layout.q_regions.labels.device
    require(device == q.device, f"layout: is on {device} but q is on {q.device}")


def sma_attention(q, k, v, q_regions=None, k_regions=None, bias=None, allow=None, scale=None, *, layout=None,
                  return_lse=False, return_region_mass=False, backend="auto"):
    """Spatially-modulated attention (docs/semantics.md).

    ``softmax(scale * q k^T + Mq W Mk^T, masked by allow) v`` per batch row and head.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D). fp16, bf16 or fp32 (float64 on the torch backend);
            finite (NaN or inf is a ValueError).
        q_regions, k_regions: hard labels (N,) / (B, N) of an integer dtype, or soft
            memberships (N, R) / (B, N, R) that sum to 1 per token.
        bias: region-pair bias W of shape (R, R), (H, R, R) or (B, H, R, R), entries finite and
            within +-1e38 (ValueError otherwise); None is 0.
        allow: bool (R, R) or (B, R, R); allow[label(q), label(k)] False blocks the pair.
        scale: score scale, default D ** -0.5.
        layout: an SMALayout from ``prepare_regions`` instead of q_regions, k_regions and allow:
            the regions checked and the tile lists built once, for many calls. Such a call reads
            no tensor value on the host (no GPU sync), so neither q, k, v nor the bias is checked
            there: a NaN, inf or out-of-range entry gives NaN rows instead of a ValueError.
        return_lse: also return the natural-log logsumexp of each score row, (B, H, Nq).
        return_region_mass: also return softmax(S) Mk, (B, H, Nq, R).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked, any
            device) or "auto".

    Differentiable in q, k, v and bias (the bias gradient is reduced to the shape given);
    both backends' backward passes are bitwise repeatable (the Triton one computes dq in
    its own pass, with no atomics);
    region memberships get no gradient. Registered as the custom op
    ``torch.ops.mild_kernels.sma_forward``, so torch.compile traces it whole.

    Returns:
        The output (B, H, Nq, D), or ``SMAOutput(out, lse, region_mass)`` when a
        ``return_`` flag is set (None for what was not asked). Rows whose keys are all
        blocked give 0 and lse = -inf.
    """
    q, k, v = autocast_inputs(q, k, v)
    with autocast_off(q):
        return _sma_attention(q, k, v, q_regions, k_regions, bias, allow, scale, layout, return_lse,
                              return_region_mass, backend)


def _sma_attention(q, k, v, q_regions, k_regions, bias, allow, scale, layout, return_lse, return_region_mass,
                   backend):
    check_backend(backend, BACKENDS)
    _check_qkv(q, k, v, backend)
    chosen = choose_backend(backend, q.device, offered=BACKENDS)
    B, H, _, D = q.shape
    if layout is None:
        require(q_regions is not None, "q_regions: give the query regions, or a prepared layout")
        check_tensor("q_regions", q_regions)
        check_tensor("k_regions", k_regions)
        check_same_device(q=q, q_regions=q_regions, k_regions=k_regions, allow=allow)
        for name, t, n in (("q_regions", q_regions, q.shape[2]), ("k_regions", k_regions, k.shape[2])):
            require(t.dim() >= 1 and tokens_of(t) == n, f"{name}: has {tokens_of(t)} tokens but the attention has {n}")
        stated = int(bias.shape[-1]) if isinstance(bias, torch.Tensor) and bias.dim() >= 2 else None
        layout = prepare_regions(q_regions, k_regions, allow, num_regions=stated, batch=B, tiles=chosen == "triton",
                                 read_info=False)
        check_values, caller_given = True, False
    else:
        require(q_regions is None and k_regions is None and allow is None,
                "layout: carries the regions and the allow table; pass q_regions, k_regions and allow to "
                "prepare_regions instead")
        check_values, caller_given = False, True  # a prepared call reads no tensor value: on a GPU each is a sync
    _check_layout(layout, q, k, caller_given)
    bias4 = _check_bias(bias, B, H, layout.num_regions, q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    require(scale == scale and abs(scale) != float("inf"), f"scale: must be finite, got {scale}")
    if chosen == "triton" and layout.tiles is None:
        raise ValueError("layout: was prepared without tile lists; use prepare_regions(...) with tiles=True")
    # The one copy the kernels need (Triton's row loads, and aten's fused CPU attention, which
    # silently miscomputes a strided head dim), made here so that autograd saves it.
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    save_tables = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias4))
    tensors, ints = flatten_layout(layout)
    out, lse, mass, _ = sma_forward(q, k, v, tensors, ints, bias4, scale, return_region_mass, save_tables, check_values,
                                    chosen)
    if not (return_lse or return_region_mass):
        return out
    return SMAOutput(out, lse if return_lse else None, mass if return_region_mass else None)
