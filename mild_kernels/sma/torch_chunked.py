"""Memory-bounded spatially-modulated attention in plain torch, for any device.

Queries are processed in chunks of ``chunk`` tokens, all heads at once, so the
largest temporary is (H, chunk, keys) rather than (B, H, Nq, Nk). Each chunk
visits only the key tiles that the tile-sparsity lists name (sparsity.py):
blocked tiles are never gathered or multiplied. With region-sorted tokens the
visited keys of a chunk are a few contiguous runs.

Blocked pairs enter as -inf in a masked bias table, so one gather gives both the
bias and the mask for hard labels, and ``baddbmm`` adds it to the scores for free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._runtime import empty, empty_like
from .regions import Regions
from .sparsity import tile_sparsity

KEY_BLOCK = 64
SCORE_BUDGET = 1 << 21  # elements of the (H, chunk, keys) score block
MAX_CHUNK = 128  # query rows; smaller chunks skip at a finer grain


def chunk_size(heads: int, keys: int, queries: int) -> int:
    rows = max(16, SCORE_BUDGET // max(1, heads * keys)) // 16 * 16
    return min(rows, MAX_CHUNK, max(16, queries))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def masked_bias_table(bias: torch.Tensor, allow: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(B|1, H|1, R, R) bias with -inf at blocked pairs."""
    table = bias.to(dtype)
    if allow is None:
        return table
    return table.masked_fill(~allow[:, None], float("-inf"))


def _fused_cpu_attention():
    """aten's fused CPU flash attention, which also returns the logsumexp, if this torch has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


USE_FUSED_CPU = True  # tests switch it off to cover the portable path on the CPU


def attend(q, k, v, scores_bias, scale):
    """softmax(scale q k^T + scores_bias) v and its logsumexp, for one chunk (H, C, *).

    ``scores_bias`` holds -inf at blocked pairs. Rows with every key blocked come back
    with 0 and an lse the caller overwrites. ``v`` may be wider than ``q`` (the region
    memberships ride along as extra value columns).
    """
    fused = _fused_cpu_attention() if USE_FUSED_CPU and q.device.type == "cpu" else None
    if fused is not None:
        extra = v.shape[-1] - q.shape[-1]
        if extra:  # the fused kernel wants one head dim: zero columns add nothing to q k^T
            q, k = F.pad(q, (0, extra)), F.pad(k, (0, extra))
        out, lse = fused(q[None], k[None], v[None], 0.0, False, attn_mask=scores_bias[None], scale=scale)
        return out[0], lse[0]
    scores = torch.baddbmm(scores_bias, q, k.transpose(1, 2), alpha=scale)
    peak = scores.amax(-1, keepdim=True)
    peak.masked_fill_(peak == float("-inf"), 0.0)
    probs = scores.sub_(peak).exp_()
    total = probs.sum(-1, keepdim=True)
    inv_total = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    return torch.bmm(probs, v) * inv_total, (peak + total.log()).squeeze(-1)


def sma_forward_torch(q, k, v, q_regions: Regions, k_regions: Regions, bias, allow, scale,
                      num_regions, return_mass, chunk: int | None = None):
    """Forward pass; returns out (q.dtype), lse (float32 or float64), mass or None.

    Args:
        bias: (B|1, H|1, R, R) float table; allow: (B|1, R, R) bool or None.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = num_regions
    dtype = compute_dtype(q.dtype)
    chunk = chunk or chunk_size(H, Nk, Nq)
    sparsity = tile_sparsity(q_regions.labels, k_regions.labels, allow, R, chunk, KEY_BLOCK)
    table = masked_bias_table(bias, allow, dtype)
    soft = q_regions.is_soft

    out = empty_like(q)
    lse = empty((B, H, Nq), dtype=dtype, device=q.device)
    mass = empty((B, H, Nq, R), dtype=dtype, device=q.device) if return_mass else None
    key_offsets = torch.arange(KEY_BLOCK, device=q.device)

    def row(t, b):
        return t[min(b, t.shape[0] - 1)]

    for b in range(B):
        kb, vb = k[b].to(dtype), v[b].to(dtype)
        lk_b = row(k_regions.labels, b).long()
        mk_b = row(k_regions.memberships, b).to(dtype) if soft else None
        allow_b = None if allow is None else row(allow, b)
        for t, m0 in enumerate(range(0, Nq, chunk)):
            m1 = min(Nq, m0 + chunk)
            tiles = sparsity.active_tiles(b, t)
            if tiles.numel() == 0:
                out[b, :, m0:m1] = 0
                lse[b, :, m0:m1] = float("-inf")
                if return_mass:
                    mass[b, :, m0:m1] = 0
                continue
            if tiles.numel() * KEY_BLOCK >= Nk:
                kc, vc, lk, mk = kb, vb, lk_b, mk_b
            else:
                keys = (tiles.long().sort().values[:, None] * KEY_BLOCK + key_offsets).flatten()
                keys = keys[keys < Nk]
                kc, vc, lk = kb.index_select(1, keys), vb.index_select(1, keys), lk_b[keys]
                mk = mk_b[keys] if soft else None
            lq = row(q_regions.labels, b)[m0:m1].long()
            if soft:
                mq = row(q_regions.memberships, b)[m0:m1].to(dtype)
                scores_bias = (mq @ row(bias, b).to(dtype) @ mk.T).expand(H, -1, -1)
                if allow is not None:
                    scores_bias = scores_bias.masked_fill(~allow_b[lq][:, lk], float("-inf"))
            else:
                scores_bias = row(table, b)[:, lq].index_select(-1, lk).expand(H, -1, -1)
                if return_mass:
                    mk = F.one_hot(lk, R).to(dtype)
            if return_mass:
                vc = torch.cat([vc, mk.expand(H, -1, -1)], dim=-1)
            chunk_out, chunk_lse = attend(q[b, :, m0:m1].to(dtype), kc, vc, scores_bias, scale)
            if allow is not None:
                present = torch.zeros(R, dtype=torch.bool, device=q.device)
                present[lk] = True
                chunk_lse.masked_fill_(~allow_b[lq][:, present].any(-1), float("-inf"))
            out[b, :, m0:m1] = chunk_out[..., :D].to(q.dtype)
            lse[b, :, m0:m1] = chunk_lse
            if return_mass:
                mass[b, :, m0:m1] = chunk_out[..., D:]
    return out, lse, mass


def sma_backward_torch(q, k, v, out, lse, grad_out, grad_lse, grad_mass, mass, q_regions: Regions,
                       k_regions: Regions, bias, allow, scale, num_regions, chunk: int | None = None):
    """Gradients (dq, dk, dv, dbias) of the forward pass, recomputed chunk by chunk from lse.

    With S the scores and P = exp(S - lse):
        dP = dO V^T + dMass Mk^T,   dS = P * (dP - delta),
        delta = rowsum(dO * O) + rowsum(dMass * Mass) - dlse,
        dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dW[b, h] = Mq^T dS Mk.
    dbias comes back as (B, H, R, R); the caller reduces it to the shape it was given.
    Memberships get no gradient.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    R = num_regions
    dtype = compute_dtype(q.dtype)
    chunk = chunk or chunk_size(H, Nk, Nq)
    sparsity = tile_sparsity(q_regions.labels, k_regions.labels, allow, R, chunk, KEY_BLOCK)
    table = masked_bias_table(bias, allow, dtype)
    soft = q_regions.is_soft
    key_offsets = torch.arange(KEY_BLOCK, device=q.device)

    dq = torch.zeros(B, H, Nq, D, dtype=dtype, device=q.device)
    dk = torch.zeros(B, H, Nk, D, dtype=dtype, device=q.device)
    dv = torch.zeros(B, H, Nk, D, dtype=dtype, device=q.device)
    dbias = torch.zeros(B, H, R, R, dtype=dtype, device=q.device)
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1)
    if grad_mass is not None:
        delta += (grad_mass.to(dtype) * mass.to(dtype)).sum(-1)
    if grad_lse is not None:
        delta -= grad_lse.to(dtype)
    lse_shift = lse.to(dtype).masked_fill(lse == float("-inf"), float("inf"))  # blocked rows: P = 0

    def row(t, b):
        return t[min(b, t.shape[0] - 1)]

    for b in range(B):
        kb, vb = k[b].to(dtype), v[b].to(dtype)
        lk_b = row(k_regions.labels, b).long()
        mk_b = row(k_regions.memberships, b).to(dtype) if soft else F.one_hot(lk_b, R).to(dtype)
        allow_b = None if allow is None else row(allow, b)
        for t, m0 in enumerate(range(0, Nq, chunk)):
            m1 = min(Nq, m0 + chunk)
            tiles = sparsity.active_tiles(b, t)
            if tiles.numel() == 0:
                continue
            if tiles.numel() * KEY_BLOCK >= Nk:
                keys = torch.arange(Nk, device=q.device)
            else:
                keys = (tiles.long().sort().values[:, None] * KEY_BLOCK + key_offsets).flatten()
                keys = keys[keys < Nk]
            kc, vc, lk, mk = kb[:, keys], vb[:, keys], lk_b[keys], mk_b[keys]
            qc = q[b, :, m0:m1].to(dtype)
            lq = row(q_regions.labels, b)[m0:m1].long()
            mq = row(q_regions.memberships, b)[m0:m1].to(dtype) if soft else F.one_hot(lq, R).to(dtype)
            if soft:
                scores_bias = (mq @ row(bias, b).to(dtype) @ mk.T).expand(H, -1, -1)
                if allow is not None:
                    scores_bias = scores_bias.masked_fill(~allow_b[lq][:, lk], float("-inf"))
            else:
                scores_bias = row(table, b)[:, lq].index_select(-1, lk).expand(H, -1, -1)
            scores = torch.baddbmm(scores_bias, qc, kc.transpose(1, 2), alpha=scale)
            probs = scores.sub_(lse_shift[b, :, m0:m1, None]).exp_()
            go = grad_out[b, :, m0:m1].to(dtype)
            dprobs = torch.bmm(go, vc.transpose(1, 2))
            if grad_mass is not None:
                dprobs += grad_mass[b, :, m0:m1].to(dtype) @ mk.T
            dscores = probs * (dprobs - delta[b, :, m0:m1, None])
            dq[b, :, m0:m1] = scale * torch.bmm(dscores, kc)
            dk[b].index_add_(1, keys, scale * torch.bmm(dscores.transpose(1, 2), qc))
            dv[b].index_add_(1, keys, torch.bmm(probs.transpose(1, 2), go))
            dbias[b] += mq.T @ dscores @ mk
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
