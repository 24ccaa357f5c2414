"""Spatially-modulated attention written plainly: dense, materialised, any float dtype.

    S = scale * Q K^T + Mq W Mk^T,  S[q, k] = -inf where allow[label(q), label(k)] is False
    O = softmax(S) V,  lse = logsumexp(S),  region_mass = softmax(S) Mk

Rows whose keys are all blocked give O = 0, lse = -inf and zero region mass.
Tests run it on float64 copies of the inputs as the ground truth.
"""

from __future__ import annotations

import torch


# Labels and memberships are derived here, not imported from regions.py as the backends do:
# a bug there (say, in the argmax's tie-breaking) must not pass as correct.
def _num_regions(q_regions, k_regions, bias, allow) -> int:
    for table in (bias, allow):
        if table is not None:
            return table.shape[-1]
    for regions in (q_regions, k_regions):
        if regions.is_floating_point():
            return regions.shape[-1]
    labels = [r for r in (q_regions, k_regions) if r.numel()]
    return 1 + int(max(r.max() for r in labels)) if labels else 1


def _memberships(regions, R, dtype):
    """Soft memberships as given; hard labels one-hot."""
    if regions.is_floating_point():
        return regions.to(dtype)
    return (regions.long()[..., None] == torch.arange(R, device=regions.device)).to(dtype)


def _labels(regions, R):
    """Hard labels as given; a soft token's label is its largest membership, the lowest index on a tie."""
    if not regions.is_floating_point():
        return regions.long()
    index = torch.arange(R, device=regions.device).expand(regions.shape)
    return torch.where(regions == regions.max(-1, keepdim=True).values, index, R).min(-1).values


def sma_attention_reference(q, k, v, q_regions, k_regions, bias=None, allow=None, scale=None, *,
                            return_lse=False, return_region_mass=False):
    B, H, Nq, D = q.shape
    R = _num_regions(q_regions, k_regions, bias, allow)
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype

    Mq = _memberships(q_regions, R, dtype).expand(B, Nq, R)
    Mk = _memberships(k_regions, R, dtype).expand(B, k.shape[2], R)
    W = torch.zeros(R, R, dtype=dtype, device=q.device) if bias is None else bias.to(dtype)
    W = W.expand(B, H, R, R)

    scores = scale * q @ k.transpose(-1, -2) + Mq[:, None] @ W @ Mk[:, None].transpose(-1, -2)
    if allow is not None:
        lq = _labels(q_regions, R).expand(B, Nq)
        lk = _labels(k_regions, R).expand(B, k.shape[2])
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
