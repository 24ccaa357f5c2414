"""SMA as torch.library custom ops: forward, backward, fake kernels and autograd.

The public wrapper (interface.py) does the checks that depend only on shapes and
dtypes, then calls ``torch.ops.mild_kernels.sma_forward``. Everything that looks
at values (label ranges, membership sums, a finite bias, the tile-sparsity lists)
runs inside the op, so ``torch.compile(fullgraph=True)`` traces a caller without
graph breaks: the compiler sees one opaque op with a fake kernel for shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_finite
from .regions import Regions, check_region_values
from .sparsity import tile_sparsity
from . import torch_region_pairs
from .torch_chunked import compute_dtype, sma_backward_torch, sma_forward_torch

NO_TENSOR = torch.empty(0)  # stands for an absent optional output


def _regions(labels: Tensor, memberships: Optional[Tensor]) -> Regions:
    return Regions(labels, memberships)


def _stats_dtype(q: Tensor, backend: str) -> torch.dtype:
    """dtype of lse and region mass: float32, or float64 for float64 inputs (torch backend)."""
    return compute_dtype(q.dtype) if backend == "torch" else torch.float32


@torch.library.custom_op("mild_kernels::sma_forward", mutates_args=())
def sma_forward(q: Tensor, k: Tensor, v: Tensor, q_labels: Tensor, k_labels: Tensor,
                q_memberships: Optional[Tensor], k_memberships: Optional[Tensor], bias: Tensor,
                allow: Optional[Tensor], scale: float, num_regions: int, return_mass: bool,
                backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, region mass or an empty tensor). See interface.sma_attention.

    ``deterministic`` only shapes the backward pass; autograd reads it from here.
    """
    qr, kr = _regions(q_labels, q_memberships), _regions(k_labels, k_memberships)
    check_region_values("q_regions", qr, num_regions)
    check_region_values("k_regions", kr, num_regions)
    check_finite("bias", bias)
    if backend == "torch":
        forward = (torch_region_pairs.sma_forward_by_region_pairs
                   if torch_region_pairs.applies(q, qr, kr, num_regions) else sma_forward_torch)
        out, lse, mass = forward(q, k, v, qr, kr, bias, allow, scale, num_regions, return_mass)
    else:
        out, lse, mass = _forward_triton(q, k, v, qr, kr, bias, allow, scale, num_regions, return_mass)
    return out, lse, (mass if return_mass else NO_TENSOR.to(lse.device))


def _forward_triton(q, k, v, qr, kr, bias, allow, scale, num_regions, return_mass):
    from .triton_forward import LOG2E, forward_config, sma_forward_triton

    config = forward_config(q.shape[-1], q.dtype, qr.is_soft, return_mass, num_regions)
    sparsity = tile_sparsity(qr.labels, kr.labels, allow, num_regions, config.block_m, config.block_n)
    bias_log2 = (bias.float() * LOG2E).contiguous()
    bits = allow_bitmask(allow, num_regions, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return sma_forward_triton(q, k, v, qr, kr, bias_log2, bits, sparsity, scale, num_regions, return_mass, config)


def allow_bitmask(allow: Optional[Tensor], num_regions: int, device) -> Tensor:
    """(B|1, R) integers whose bit s of row r is allow[r, s]; int32 when R <= 32."""
    if allow is None:
        allow = torch.ones(1, num_regions, num_regions, dtype=torch.bool, device=device)
    weights = torch.ones(num_regions, dtype=torch.int64, device=device) << torch.arange(num_regions, device=device)
    bits = (allow.long() * weights).sum(-1)  # distinct powers of two: the sum is the OR
    return (bits.to(torch.int32) if num_regions <= 32 else bits).contiguous()


@sma_forward.register_fake
def _(q, k, v, q_labels, k_labels, q_memberships, k_memberships, bias, allow, scale, num_regions, return_mass,
      backend, deterministic):
    B, H, Nq, _ = q.shape
    stats = _stats_dtype(q, backend)
    mass = q.new_empty((B, H, Nq, num_regions), dtype=stats) if return_mass else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=stats), mass


@torch.library.custom_op("mild_kernels::sma_backward", mutates_args=())
def sma_backward(grad_out: Tensor, grad_lse: Optional[Tensor], grad_mass: Optional[Tensor], q: Tensor, k: Tensor,
                 v: Tensor, out: Tensor, lse: Tensor, mass: Optional[Tensor], q_labels: Tensor, k_labels: Tensor,
                 q_memberships: Optional[Tensor], k_memberships: Optional[Tensor], bias: Tensor,
                 allow: Optional[Tensor], scale: float, num_regions: int, backend: str,
                 deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias as (B, H, R, R))."""
    qr, kr = _regions(q_labels, q_memberships), _regions(k_labels, k_memberships)
    if backend == "torch":
        return sma_backward_torch(q, k, v, out, lse, grad_out, grad_lse, grad_mass, mass, qr, kr, bias, allow, scale,
                                  num_regions)
    from .triton_backward import sma_backward_triton_launch

    return sma_backward_triton_launch(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, qr, kr, bias, allow,
                                      scale, num_regions, deterministic)


@sma_backward.register_fake
def _(grad_out, grad_lse, grad_mass, q, k, v, out, lse, mass, q_labels, k_labels, q_memberships, k_memberships,
      bias, allow, scale, num_regions, backend, deterministic):
    B, H = q.shape[:2]
    dbias = q.new_empty((B, H, num_regions, num_regions), dtype=_stats_dtype(q, backend))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, q_labels, k_labels, q_mem, k_mem, bias, allow, scale, num_regions, return_mass, backend,
     deterministic) = inputs
    out, lse, mass = output
    ctx.save_for_backward(q, k, v, q_labels, k_labels, q_mem, k_mem, bias, allow, out, lse,
                          mass if return_mass else None)
    ctx.scale, ctx.num_regions, ctx.backend, ctx.deterministic = scale, num_regions, backend, deterministic
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read


def _backward(ctx, grad_out, grad_lse, grad_mass):
    q, k, v, q_labels, k_labels, q_mem, k_mem, bias, allow, out, lse, mass = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = torch.ops.mild_kernels.sma_backward(
        grad_out.contiguous(), grad_lse, grad_mass if mass is not None else None, q, k, v, out, lse, mass, q_labels,
        k_labels, q_mem, k_mem, bias, allow, ctx.scale, ctx.num_regions, ctx.backend, ctx.deterministic)
    reduce_dims = [d for d in (0, 1) if bias.shape[d] == 1]
    dbias = (dbias.sum(reduce_dims, keepdim=True) if reduce_dims else dbias).to(bias.dtype)
    return dq, dk, dv, None, None, None, None, dbias, None, None, None, None, None, None

torch.library.register_autograd("mild_kernels::sma_forward", _backward, setup_context=_setup_context)
