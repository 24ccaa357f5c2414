"""Spatially-modulated attention written plainly: dense, materialised, any float dtype.

    S = scale * Q K^T + Mq W Mk^T,  S[q, k] = -inf where allow[label(q), label(k)] is False
    O = softmax(S) V,  lse = logsumexp(S),  region_mass = softmax(S) Mk

Rows whose keys are all blocked give O = 0, lse = -inf and zero region mass.
Tests run it on float64 copies of the inputs as the ground truth.
"""

from __future__ import annotations

import torch

from .regions import hard_labels, memberships, num_regions_of


def sma_attention_reference(q, k, v, q_regions, k_regions, bias=None, allow=None, scale=None, *,
                            return_lse=False, return_region_mass=False):
    B, H, Nq, D = q.shape
    R = num_regions_of(q_regions, k_regions, bias, allow)
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype

    Mq = memberships(q_regions, R, dtype).expand(B, Nq, R)
    Mk = memberships(k_regions, R, dtype).expand(B, k.shape[2], R)
    W = torch.zeros(R, R, dtype=dtype, device=q.device) if bias is None else bias.to(dtype)
    W = W.expand(B, H, R, R)

    scores = scale * q @ k.transpose(-1, -2) + Mq[:, None] @ W @ Mk[:, None].transpose(-1, -2)
    if allow is not None:
        lq = hard_labels(q_regions).long().expand(B, Nq)
        lk = hard_labels(k_regions).long().expand(B, k.shape[2])
        table = allow.expand(B, R, R)
        rows = torch.arange(B, device=q.device)[:, None, None]
        allowed = table[rows, lq[:, :, None], lk[:, None, :]]  # (B, Nq, Nk)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))

    # Rows with every key blocked: P = 0 and lse = -inf, with gradients that stay finite.
    blocked = (scores == float("-inf")).all(-1, keepdim=True)
    scores = scores.masked_fill(blocked, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(blocked[..., 0], float("-inf"))
    out = probs @ v
    if not (return_lse or return_region_mass):
        return out
    mass = probs @ Mk[:, None] if return_region_mass else None
    return out, (lse if return_lse else None), mass
