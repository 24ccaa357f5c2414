"""Layer composition written plainly.

    C = original;  for each layer l, back to front:  C = a_l * layer_l + (1 - a_l) * C     ("over")
    out = r * C + (1 - r) * original,  and out = original bit for bit where r == 0

layers (L, B, C, H, W) back to front, alphas (L, B, 1, H, W), original (B, C, H, W) and
region (B, 1, H, W), the feathered erased union. The layers go over the original, so a
pixel that no layer covers shows the photo. Computed in float32 (or the inputs' dtype
when wider); the result has the original's dtype.
"""

from __future__ import annotations

import torch


def composite_layers_reference(layers, alphas, original, region):
    compute = torch.promote_types(original.dtype, torch.float32)
    base = original.to(compute)
    acc = base
    for layer, alpha in zip(layers, alphas):
        a = alpha.to(compute)
        acc = a * layer.to(compute) + (1 - a) * acc
    r = region.to(compute)
    out = (r * acc + (1 - r) * base).to(original.dtype)
    return torch.where(region == 0, original, out)
