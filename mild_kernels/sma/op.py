"""SMA as torch.library custom ops: forward, backward, fake kernels and autograd.

The public wrapper (interface.py) checks shapes and dtypes and brings the regions to an
SMALayout (layout.py: validated once, with the Triton kernels' tile lists). A layout
travels through the ops as a list of tensors plus a list of ints (``flatten_layout``),
so ``torch.compile(fullgraph=True)`` traces a caller without graph breaks: the compiler
sees one opaque op with a fake kernel for shapes. Nothing inside the ops reads a tensor
value on the host: with a prepared layout a call makes no GPU sync.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_finite
from .layout import SMALayout, TileInfo, TileLists
from .regions import Regions
from . import torch_region_pairs
from .torch_chunked import compute_dtype, sma_backward_torch, sma_forward_torch

NO_TENSOR = torch.empty(0)  # stands for an absent optional tensor
# The Triton kernels keep scores in log2 units: W log2(e) must stay a finite fp32 (< 2.36e38).
MAX_BIAS = 1e38


def flatten_layout(layout: SMALayout) -> tuple[list[Tensor], list[int]]:
    """The layout's tensors (absent ones as empty tensors) and ints, as the custom ops take them."""
    qr, kr = layout.q_regions, layout.k_regions
    tensors = [qr.labels, kr.labels, _or_empty(qr.memberships), _or_empty(kr.memberships), _or_empty(layout.k_split),
               _or_empty(layout.allow), layout.allow_bits]
    ints = [layout.num_regions, int(qr.is_soft)]
    if layout.tiles is not None:
        tensors += [*layout.tiles, layout.tile_flags]
    if layout.info is not None:
        ints += [int(value) for value in layout.info]
    return tensors, ints


def unflatten_layout(tensors: list[Tensor], ints: list[int]) -> SMALayout:
    """The SMALayout again; tile flags not read at prepare time are read here (a host sync)."""
    q_labels, k_labels, q_mem, k_mem, k_split, allow, allow_bits = tensors[:7]
    soft = bool(ints[1])
    tiles = TileLists(*tensors[7:-1]) if len(tensors) > 7 else None
    flags = tensors[-1] if len(tensors) > 7 else None
    if len(ints) > 2:
        info = TileInfo(*(bool(v) for v in ints[2:]))
    else:
        info = TileInfo(*(bool(v) for v in flags.tolist())) if flags is not None else None
    return SMALayout(ints[0], Regions(q_labels, q_mem if soft else None), Regions(k_labels, k_mem if soft else None),
                     allow if allow.numel() else None, allow_bits, k_split if k_split.numel() else None, tiles, flags,
                     info, None, None, None, None)


def _or_empty(t: Optional[Tensor]) -> Tensor:
    return NO_TENSOR if t is None else t


def _stats_dtype(q: Tensor, backend: str) -> torch.dtype:
    """dtype of lse and region mass: float32, or float64 for float64 inputs (torch backend)."""
    return compute_dtype(q.dtype) if backend == "torch" else torch.float32


def _dense_bias(bias: Optional[Tensor], num_regions: int, device) -> Tensor:
    return torch.zeros(1, 1, num_regions, num_regions, device=device) if bias is None else bias


@torch.library.custom_op("mild_kernels::sma_forward", mutates_args=())
def sma_forward(q: Tensor, k: Tensor, v: Tensor, layout_tensors: list[Tensor], layout_ints: list[int],
                bias: Optional[Tensor], scale: float, return_mass: bool, save_tables: bool, check_values: bool,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, region mass or empty, the bias table QW (B, H, R, Nq) that the backward reads or
    empty). See interface.sma_attention.

    ``check_values`` reads q, k, v and the bias on the host to refuse NaN, inf and a bias past
    MAX_BIAS (a raw call; inside the op, so torch.compile traces no data-dependent branch).
    """
    if check_values:
        # Blocked pairs must not see a key's NaN (the kernels skip blocked tiles, a mask would
        # not): one host read for the three, a second only to name the culprit.
        if not bool(torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()):
            name = next(n for n, t in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(t).all()))
            raise ValueError(f"{name}: contains NaN or inf; sma_attention needs finite inputs")
        if bias is not None:
            check_finite("bias", bias, MAX_BIAS)
    layout = unflatten_layout(layout_tensors, layout_ints)
    R = layout.num_regions
    if backend == "torch":
        qr, kr = layout.q_regions, layout.k_regions
        table = _dense_bias(bias, R, q.device)
        forward = (torch_region_pairs.sma_forward_by_region_pairs
                   if torch_region_pairs.applies(q, qr, kr, R, table) else sma_forward_torch)
        out, lse, mass = forward(q, k, v, qr, kr, table, layout.allow, scale, R, return_mass)
        qw = None
    else:
        from .configs import forward_config
        from .triton_forward import sma_forward_triton

        config = forward_config(q.shape[-1], q.dtype, return_mass, R, q.device)
        out, lse, mass, qw = sma_forward_triton(q, k, v, layout, bias, scale, return_mass, config)
    return (out, lse, mass if return_mass else lse.new_empty(0),
            qw if save_tables and qw is not None else lse.new_empty(0))


@sma_forward.register_fake
def _(q, k, v, layout_tensors, layout_ints, bias, scale, return_mass, save_tables, check_values, backend):
    B, H, Nq, _ = q.shape
    R = layout_ints[0]
    stats = _stats_dtype(q, backend)
    mass = q.new_empty((B, H, Nq, R), dtype=stats) if return_mass else q.new_empty((0,), dtype=torch.float32)
    qw = (q.new_empty((B, H, R, Nq), dtype=torch.float32) if save_tables and backend != "torch"
             else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=stats), mass, qw


@torch.library.custom_op("mild_kernels::sma_backward", mutates_args=())
def sma_backward(grad_out: Tensor, grad_lse: Optional[Tensor], grad_mass: Optional[Tensor], q: Tensor, k: Tensor,
                 v: Tensor, out: Tensor, lse: Tensor, mass: Optional[Tensor], qw: Tensor,
                 layout_tensors: list[Tensor], layout_ints: list[int], bias: Optional[Tensor], scale: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias as (B, H, R, R))."""
    layout = unflatten_layout(layout_tensors, layout_ints)
    R = layout.num_regions
    if backend == "torch":
        return sma_backward_torch(q, k, v, out, lse, grad_out, grad_lse, grad_mass, mass, layout.q_regions,
                                  layout.k_regions, _dense_bias(bias, R, q.device), layout.allow, scale, R)
    from .configs import backward_config
    from .triton_backward import sma_backward_triton

    config = backward_config(q.shape[-1], q.dtype, grad_mass is not None, R, q.device)
    return sma_backward_triton(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, qw, layout, bias, scale,
                               config)


@sma_backward.register_fake
def _(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, qw, layout_tensors, layout_ints, bias, scale,
      backend):
    B, H = q.shape[:2]
    R = layout_ints[0]
    dbias = q.new_empty((B, H, R, R), dtype=_stats_dtype(q, backend))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, layout_tensors, layout_ints, bias, scale, return_mass, save_tables, check_values, backend = inputs
    out, lse, mass, qw = output
    ctx.save_for_backward(q, k, v, bias, out, lse, mass if return_mass else None, qw, *layout_tensors)
    ctx.layout_ints = layout_ints
    ctx.scale, ctx.backend = scale, backend
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read


def _backward(ctx, grad_out, grad_lse, grad_mass, grad_qw):
    q, k, v, bias, out, lse, mass, qw, *layout_tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    grad_mass = None if grad_mass is None or mass is None else grad_mass.contiguous()
    dq, dk, dv, dbias = torch.ops.mild_kernels.sma_backward(
        grad_out.contiguous(), grad_lse, grad_mass, q, k, v, out, lse, mass, qw,
        layout_tensors, ctx.layout_ints, bias, ctx.scale, ctx.backend)
    no_grads = [None] * len(layout_tensors)  # the regions get no gradient
    if bias is not None:
        reduce_dims = [d for d in (0, 1) if bias.shape[d] == 1]
        dbias = (dbias.sum(reduce_dims, keepdim=True) if reduce_dims else dbias).to(bias.dtype)
    else:
        dbias = None
    return dq, dk, dv, no_grads, None, dbias, None, None, None, None, None


torch.library.register_autograd("mild_kernels::sma_forward", _backward, setup_context=_setup_context)
