"""Memory-bounded spatially-modulated attention in plain torch, for any device.

Queries are processed in chunks of at most ``MAX_CHUNK`` tokens, all heads at once,
so the largest temporary is (H, chunk, keys) rather than (B, H, Nq, Nk). Each chunk
visits only the key tiles that the tile-sparsity lists name (sparsity.py): blocked
tiles are never gathered or multiplied. With region-sorted tokens the visited keys of
a chunk are a few contiguous runs.

The chunk's bias is the bias table's entries gathered by label pair (hard labels, exact)
or one small matmul ``(Mq W) Mk^T`` of K = R (soft). Blocked pairs get -inf, whatever the size of the bias,
and rows with no allowed key are set to 0 / -inf afterwards.

The forward pass for hard labels on the CPU goes by region pair instead (torch_region_pairs.py);
the backward pass is this module's for every case.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import _runtime
from .._runtime import empty, empty_like, unit_last_stride
from .regions import Regions
from .sparsity import tile_sparsity

KEY_BLOCK = 64
SCORE_BUDGET = 1 << 21  # elements of the (H, chunk, keys) score block
MAX_CHUNK = 128  # query rows; smaller chunks skip at a finer grain

USE_FUSED_CPU = True  # tests switch it off to cover the portable path on the CPU


def chunk_size(heads: int, keys: int, queries: int) -> int:
    rows = max(16, SCORE_BUDGET // max(1, heads * keys)) // 16 * 16
    return min(rows, MAX_CHUNK, max(16, queries))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def batch_row(t: torch.Tensor, b: int) -> torch.Tensor:
    """Row b of a tensor whose batch dim is B or 1 (shared by every row)."""
    return t[min(b, t.shape[0] - 1)]


@dataclasses.dataclass
class Chunk:
    b: int
    rows: slice
    keys: torch.Tensor | None  # visited key tokens, None for all of them

    @property
    def sees_nothing(self) -> bool:
        return self.keys is not None and self.keys.numel() == 0
    scores_bias: torch.Tensor  # (H|1, C, keys): bias, -inf at blocked pairs
    q_memberships: torch.Tensor  # (C, R)
    k_memberships: torch.Tensor  # (keys, R)
    blocked_rows: torch.Tensor | None  # (C,) bool: rows with no allowed key, None without an allow table


def chunks(q_regions: Regions, k_regions: Regions, bias, allow, num_regions, batch, Nq, Nk, dtype,
           chunk: int) -> Iterator[Chunk]:
    """The query chunks of every batch row, with their visited keys and bias."""
    R = num_regions
    device = q_regions.labels.device
    # Skipping blocked key tiles reads the tile lists on the host; where that is not free every
    # key is visited instead (blocked pairs are -inf either way): a prepared call then reads nothing.
    sparsity = tile_sparsity(q_regions.labels, k_regions.labels, allow, R, chunk, KEY_BLOCK) \
        if _runtime.host_reads_are_free(device) else None
    key_offsets = torch.arange(KEY_BLOCK, device=device)
    soft = q_regions.is_soft

    for b in range(batch):
        lq, lk = batch_row(q_regions.labels, b).long(), batch_row(k_regions.labels, b).long()
        table = batch_row(bias, b).to(dtype)  # (H|1, R, R)
        allow_b = None if allow is None else batch_row(allow, b)
        if soft:
            mq, mk = batch_row(q_regions.memberships, b).to(dtype), batch_row(k_regions.memberships, b).to(dtype)
            q_features = mq @ table  # (H|1, Nq, R): row q of Mq W
        else:
            mq, mk = F.one_hot(lq, R).to(dtype), F.one_hot(lk, R).to(dtype)
            q_features = table[:, lq]
        for t, m0 in enumerate(range(0, Nq, chunk)):
            rows = slice(m0, min(Nq, m0 + chunk))
            tiles = None if sparsity is None else sparsity.active_tiles(b, t)
            if tiles is None or tiles.numel() * KEY_BLOCK >= Nk:
                keys = None
            else:
                keys = (tiles.long().sort().values[:, None] * KEY_BLOCK + key_offsets).flatten()
                keys = keys[keys < Nk]
            lk_keys = lk if keys is None else lk[keys]
            mk_keys = mk if keys is None else mk[keys]
            # Hard labels gather the table entries (exact); soft ones take the small matmul.
            scores_bias = q_features[:, rows] @ mk_keys.T if soft else q_features[:, rows][:, :, lk_keys]
            blocked_rows = None
            if allow_b is not None:
                allowed = allow_b[lq[rows]][:, lk_keys]  # (C, keys)
                scores_bias = scores_bias.masked_fill(~allowed, float("-inf"))
                blocked_rows = ~allowed.any(-1)
            yield Chunk(b, rows, keys, scores_bias, mq[rows], mk_keys, blocked_rows)


def fused_cpu_attention():
    """aten's fused CPU flash attention, which also returns the logsumexp, if this torch has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(q, k, v, scores_bias, scale):
    """softmax(scale q k^T + scores_bias) v and its logsumexp, for one chunk (H, C, *).

    ``v`` may be wider than ``q`` (region memberships ride along as extra value columns).
    """
    # aten's fused kernel dies on a signal with no heads; the portable path handles every shape.
    fused = fused_cpu_attention() if USE_FUSED_CPU and q.device.type == "cpu" and q.numel() else None
    if fused is not None:
        q, k, v = (unit_last_stride(t) for t in (q, k, v))  # aten's kernel misreads a strided head dim
        extra = v.shape[-1] - q.shape[-1]
        if extra:  # the fused kernel wants one head dim: zero columns add nothing to q k^T
            q, k = F.pad(q, (0, extra)), F.pad(k, (0, extra))
        out, lse = fused(q[None], k[None], v[None], 0.0, False, attn_mask=scores_bias.expand(q.shape[0], -1, -1)[None],
                         scale=scale)
        return out[0], lse[0]
    scores = torch.baddbmm(scores_bias, q, k.transpose(1, 2), alpha=scale)
    peak = scores.amax(-1, keepdim=True)
    probs = scores.sub_(peak).exp_()
    total = probs.sum(-1, keepdim=True)
    return torch.bmm(probs, v) / total, (peak + total.log()).squeeze(-1)


def sma_forward_torch(q, k, v, q_regions: Regions, k_regions: Regions, bias, allow, scale,
                      num_regions, return_mass, chunk: int | None = None):
    """Forward pass; returns out (q.dtype), lse (float32 or float64), mass or None.

    Args:
        bias: (B|1, H|1, R, R) float table; allow: (B|1, R, R) bool or None.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dtype = compute_dtype(q.dtype)
    out = empty_like(q)
    lse = empty((B, H, Nq), dtype=dtype, device=q.device)
    mass = empty((B, H, Nq, num_regions), dtype=dtype, device=q.device) if return_mass else None
    kv = None
    for c in chunks(q_regions, k_regions, bias, allow, num_regions, B, Nq, Nk, dtype, chunk or chunk_size(H, Nk, Nq)):
        if c.sees_nothing:  # every key tile of this chunk is skipped
            out[c.b, :, c.rows] = 0
            lse[c.b, :, c.rows] = float("-inf")
            if return_mass:
                mass[c.b, :, c.rows] = 0
            continue
        if kv is None or kv[0] != c.b:
            kv = (c.b, k[c.b].to(dtype), v[c.b].to(dtype))
        kc, vc = (kv[1], kv[2]) if c.keys is None else (kv[1].index_select(1, c.keys), kv[2].index_select(1, c.keys))
        if return_mass:
            vc = torch.cat([vc, c.k_memberships.expand(H, -1, -1)], dim=-1)
        chunk_out, chunk_lse = attend(q[c.b, :, c.rows].to(dtype), kc, vc, c.scores_bias, scale)
        if c.blocked_rows is not None:  # a select, not a read of blocked_rows.any(): no host sync
            chunk_out = chunk_out.masked_fill(c.blocked_rows[None, :, None], 0)
            chunk_lse = chunk_lse.masked_fill(c.blocked_rows[None, :], float("-inf"))
        out[c.b, :, c.rows] = chunk_out[..., :D].to(q.dtype)
        lse[c.b, :, c.rows] = chunk_lse
        if return_mass:
            mass[c.b, :, c.rows] = chunk_out[..., D:]
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
    dtype = compute_dtype(q.dtype)
    dq = torch.zeros(B, H, Nq, D, dtype=dtype, device=q.device)
    dk = torch.zeros(B, H, Nk, D, dtype=dtype, device=q.device)
    dv = torch.zeros(B, H, Nk, D, dtype=dtype, device=q.device)
    dbias = torch.zeros(B, H, num_regions, num_regions, dtype=dtype, device=q.device)
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1)
    if grad_mass is not None:
        delta += (grad_mass.to(dtype) * mass.to(dtype)).sum(-1)
    if grad_lse is not None:
        delta -= grad_lse.to(dtype)
    lse_shift = lse.to(dtype).masked_fill(lse == float("-inf"), float("inf"))  # blocked rows: P = 0
    kv = None
    for c in chunks(q_regions, k_regions, bias, allow, num_regions, B, Nq, Nk, dtype, chunk or chunk_size(H, Nk, Nq)):
        if c.sees_nothing:
            continue
        if kv is None or kv[0] != c.b:
            kv = (c.b, k[c.b].to(dtype), v[c.b].to(dtype))
        keys = c.keys if c.keys is not None else torch.arange(Nk, device=q.device)
        kc, vc = (kv[1], kv[2]) if c.keys is None else (kv[1].index_select(1, keys), kv[2].index_select(1, keys))
        qc = q[c.b, :, c.rows].to(dtype)
        scores = torch.baddbmm(c.scores_bias, qc, kc.transpose(1, 2), alpha=scale)
        probs = scores.sub_(lse_shift[c.b, :, c.rows, None]).exp_()
        go = grad_out[c.b, :, c.rows].to(dtype)
        dprobs = torch.bmm(go, vc.transpose(1, 2))
        if grad_mass is not None:
            dprobs += grad_mass[c.b, :, c.rows].to(dtype) @ c.k_memberships.T
        dscores = probs * (dprobs - delta[c.b, :, c.rows, None])
        dq[c.b, :, c.rows] = scale * torch.bmm(dscores, kc)
        dk[c.b].index_add_(1, keys, scale * torch.bmm(dscores.transpose(1, 2), qc))
        dv[c.b].index_add_(1, keys, torch.bmm(probs.transpose(1, 2), go))
        dbias[c.b] += c.q_memberships.T @ dscores @ c.k_memberships
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
