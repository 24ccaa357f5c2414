"""The torch backend's forward pass for hard labels on the CPU: attention by region pair.

With hard labels the bias is constant on every (query region a, key region c) block:
``softmax(s + W[a, c])`` over keys of region c is plain attention times ``exp(W[a, c])``.
So each allowed pair runs aten's fused CPU flash attention with no mask at all, and the
pairs of a query region are merged through their logsumexps, as FlashAttention merges
key blocks:

    l_ac = lse(q_a k_c^T scale) + W[a, c] - m_a,   l_a = logsumexp_c l_ac,   lse_a = m_a + l_a,
    out_a = sum_c exp(l_ac - l_a) out_ac,          mass[a, c] = exp(l_ac - l_a),

with m_a the largest allowed W[a, c], so the merged numbers stay near the scores' size.

Blocked pairs cost nothing; no bias or mask is ever built (memory O(N D)); tokens are
gathered into region order once, unless they already are in it. The chunked path
(torch_chunked.py) serves soft memberships, many regions and other devices.
"""

from __future__ import annotations

import torch

from .._runtime import unit_last_stride
from . import torch_chunked
from .regions import Regions
from .torch_chunked import batch_row, compute_dtype

MAX_REGIONS = 16  # one fused call per allowed region pair: R^2 calls per batch row
# Folding W out of the scores is exact, but the definition (and the Triton kernel, and the
# float64 reference) add W to every score: past this size, fp32's s + W drops low bits of s,
# and beyond ~1e16 float64 does too. Larger tables take the chunked path, which rounds as they do.
MAX_FOLDED_BIAS = 1024.0


def applies(q: torch.Tensor, q_regions: Regions, k_regions: Regions, num_regions: int, bias: torch.Tensor) -> bool:
    return (not q_regions.is_soft and not k_regions.is_soft and num_regions <= MAX_REGIONS
            and q.device.type == "cpu" and q.numel() > 0 and torch_chunked.USE_FUSED_CPU
            and torch_chunked.fused_cpu_attention() is not None
            and bool(bias.abs().max() <= MAX_FOLDED_BIAS))


def _region_order(labels: torch.Tensor, num_regions: int):
    """(order or None if already sorted, region boundaries as a list of R + 1 offsets)."""
    counts = torch.bincount(labels, minlength=num_regions)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    is_sorted = bool((labels[1:] >= labels[:-1]).all()) if labels.numel() > 1 else True
    return (None if is_sorted else torch.argsort(labels, stable=True)), bounds


def _in_order(x: torch.Tensor, order) -> torch.Tensor:
    return x if order is None else x.index_select(2, order)


def sma_forward_by_region_pairs(q, k, v, q_regions: Regions, k_regions: Regions, bias, allow, scale,
                                num_regions, return_mass):
    """As torch_chunked.sma_forward_torch (same arguments and results), for hard labels."""
    fused = torch_chunked.fused_cpu_attention()
    B, H, Nq, D = q.shape
    R = num_regions
    dtype = compute_dtype(q.dtype)
    out = torch.zeros(B, H, Nq, D, dtype=dtype)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=dtype)
    mass = torch.zeros(B, H, Nq, R, dtype=dtype) if return_mass else None

    for b in range(B):
        q_order, q_bounds = _region_order(batch_row(q_regions.labels, b).long(), R)
        k_order, k_bounds = _region_order(batch_row(k_regions.labels, b).long(), R)
        # aten's fused kernel misreads a strided head dim: rows with unit-stride columns.
        qs = unit_last_stride(_in_order(q[b:b + 1].to(dtype), q_order))
        ks, vs = (unit_last_stride(_in_order(t[b:b + 1].to(dtype), k_order)) for t in (k, v))
        table = batch_row(bias, b).to(dtype)  # (H|1, R, R)
        allowed = [[True] * R] * R if allow is None else batch_row(allow, b).tolist()
        # Results in region order: the outputs themselves when the queries already are.
        outs, lses = out[b:b + 1], lse[b:b + 1]
        masses = mass[b:b + 1] if return_mass else None
        if q_order is not None:
            outs, lses = torch.zeros_like(outs), torch.full_like(lses, float("-inf"))
            masses = torch.zeros_like(masses) if return_mass else None
        for a in range(R):
            rows = slice(q_bounds[a], q_bounds[a + 1])
            if rows.start == rows.stop:
                continue
            q_a = qs[:, :, rows]
            seen = [c for c in range(R) if k_bounds[c] < k_bounds[c + 1] and allowed[a][c]]
            if not seen:  # every key of this query region is blocked: out 0, lse -inf, mass 0
                continue
            # Merge relative to the row's largest bias, so the lses stay small and the masses sum to 1.
            top = table[:, a, seen].amax(-1)[None, :, None]
            acc, acc_lse, pieces = None, None, []
            for c in seen:
                keys = slice(k_bounds[c], k_bounds[c + 1])
                piece, piece_lse = fused(q_a, ks[:, :, keys], vs[:, :, keys], 0.0, False, scale=scale)
                piece_lse = piece_lse.to(dtype) + (table[:, a, c][None, :, None] - top)
                pieces.append((c, piece_lse))
                if acc is None:
                    acc, acc_lse = piece.to(dtype), piece_lse
                    continue
                merged = torch.logaddexp(acc_lse, piece_lse)
                acc.mul_((acc_lse - merged).exp_()[..., None]).add_(piece * (piece_lse - merged).exp_()[..., None])
                acc_lse = merged
            outs[:, :, rows] = acc
            lses[:, :, rows] = acc_lse + top
            if return_mass:
                for c, piece_lse in pieces:
                    masses[:, :, rows, c] = (piece_lse - acc_lse).exp()
        if q_order is not None:  # back to the caller's token order
            out[b:b + 1].index_copy_(2, q_order, outs)
            lse[b:b + 1].index_copy_(2, q_order, lses)
            if return_mass:
                mass[b:b + 1].index_copy_(2, q_order, masses)
    return out.to(q.dtype), lse, mass
