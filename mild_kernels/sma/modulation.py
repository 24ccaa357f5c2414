"""The default region-pair modulation: a same-region boost and a cross-region penalty."""

from __future__ import annotations

import torch


def default_modulation(alpha, beta, num_regions: int) -> torch.Tensor:
    """W = alpha * I - beta * (1 - I), one table per entry of alpha and beta.

    Args:
        alpha, beta: floats or tensors of one shape (e.g. (H,) per head, or (B, H) per row
            and head); differentiable, so they can be learned.
        num_regions: R.
    Returns:
        A bias table of shape alpha.shape + (R, R).
    """
    alpha, beta = torch.as_tensor(alpha), torch.as_tensor(beta)
    alpha, beta = torch.broadcast_tensors(alpha, beta)
    eye = torch.eye(num_regions, dtype=alpha.dtype if alpha.is_floating_point() else torch.float32,
                    device=alpha.device)
    return alpha[..., None, None] * eye - beta[..., None, None] * (1 - eye)
