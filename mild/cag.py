"""Cross-Domain Attention Gap, read from SMA's region mass (docs/semantics.md).

For a domain D (a set of regions), region mass P = softmax(S) Mk and query
memberships Mq:

    in(q)  = sum_{s in D} P[q, s]          out(q) = sum_{s not in D} P[q, s]
    w(q)   = sum_{r in D} Mq[q, r]
    CAG    = sum_q w(q) (in(q) - out(q)) / sum_q w(q),  averaged over heads.

Only (B, H, Nq, R) tensors are touched: never an Nq x Nk matrix.
"""

from __future__ import annotations

import torch


def domain_indicator(domains, num_regions: int, device=None) -> torch.Tensor:
    """(B, R) float: 1 for the regions in each row's domain."""
    indicator = torch.zeros(len(domains), num_regions, device=device)
    for row, domain in enumerate(domains):
        indicator[row, list(domain)] = 1.0
    return indicator


def cross_domain_attention_gap(region_mass: torch.Tensor, q_memberships: torch.Tensor,
                               domains) -> torch.Tensor:
    """CAG per batch row, in [-1, 1]; NaN for a row whose domain owns no query token.

    Args:
        region_mass: (B, H, Nq, R) from ``sma_attention(..., return_region_mass=True)``.
        q_memberships: (B, Nq, R) or (Nq, R) query memberships (one-hot rows for hard labels).
        domains: per row, the regions of its domain (e.g. ``[[0], [2]]``), or a (B, R) indicator.
    """
    B, H, Nq, R = region_mass.shape
    indicator = domains if isinstance(domains, torch.Tensor) else domain_indicator(domains, R, region_mass.device)
    indicator = indicator.to(region_mass.dtype)
    mass_in = (region_mass * indicator[:, None, None, :]).sum(-1)  # (B, H, Nq)
    mass_out = region_mass.sum(-1) - mass_in
    weights = (q_memberships.expand(B, Nq, R).to(region_mass.dtype) * indicator[:, None, :]).sum(-1)  # (B, Nq)
    gap = ((mass_in - mass_out) * weights[:, None, :]).sum(-1) / weights.sum(-1)[:, None]
    return gap.mean(1)
