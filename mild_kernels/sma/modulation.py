"""The default region-pair modulation: a same-region boost and a cross-region penalty."""

from __future__ import annotations

import operator

import torch

from .._checks import require


def default_modulation(alpha, beta, num_regions: int) -> torch.Tensor:
    """W = alpha * I - beta * (1 - I), one table per entry of alpha and beta.

    Args:
        alpha, beta: floats or tensors of one shape (e.g. (H,) per head, or (B, H) per row
            and head); differentiable, so they can be learned.
        num_regions: R.
    Returns:
        A bias table of shape alpha.shape + (R, R).
    """
    try:
        regions = operator.index(num_regions)
    except TypeError:
        regions = None
    require(regions is not None and not isinstance(num_regions, bool) and regions >= 1,
            f"num_regions: must be an integer >= 1, got {num_regions!r}")
    alpha, beta = torch.as_tensor(alpha), torch.as_tensor(beta)
    alpha, beta = torch.broadcast_tensors(alpha, beta)
    eye = torch.eye(regions, dtype=alpha.dtype if alpha.is_floating_point() else torch.float32,
                    device=alpha.device)
    return alpha[..., None, None] * eye - beta[..., None, None] * (1 - eye)
