"""The torch backend: the base GEMM for all rows, then one LoRA GEMM pair per adapter.

Rows are grouped by adapter, so each adapter's shrink and expand run once over all of
its rows; the Python loop runs over adapters present in the batch, never over rows.
Any device, any float dtype (float64 included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adapter_groups(ids: torch.Tensor):
    """(adapter, indices of its rows) for each adapter id >= 0 present in ``ids``."""
    present = torch.unique(ids[ids >= 0]).tolist()
    return [(adapter, (ids == adapter).nonzero().squeeze(1)) for adapter in present]


def adapter_scales(scale: float, scales, num_adapters: int) -> list[float]:
    return [scale * s for s in scales.tolist()] if scales is not None else [scale] * num_adapters


def multi_lora_forward_torch(x3, weight, bias, lora_a, lora_b, ids, scale, scales):
    """x3 (rows, T, K) -> (rows, T, N)."""
    y = F.linear(x3, weight, bias)
    s = adapter_scales(scale, scales, lora_a.shape[0])
    for adapter, rows in adapter_groups(ids):
        shrink = x3[rows] @ lora_a[adapter].T
        y.index_add_(0, rows, s[adapter] * (shrink @ lora_b[adapter].T))
    return y


def multi_lora_backward_torch(grad_y, x3, weight, lora_a, lora_b, ids, scale, scales):
    """(dx, dA, dB) for x3 (rows, T, K) and grad_y (rows, T, N)."""
    K, N = x3.shape[-1], grad_y.shape[-1]
    dx = grad_y @ weight
    d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    s = adapter_scales(scale, scales, lora_a.shape[0])
    for adapter, rows in adapter_groups(ids):
        x_rows = x3[rows].reshape(-1, K)
        dy_rows = grad_y[rows].reshape(-1, N)
        g = dy_rows @ lora_b[adapter]  # dL/d(shrink) / s
        dx.index_add_(0, rows, (s[adapter] * (g @ lora_a[adapter])).view(len(rows), -1, K))
        d_a[adapter] = s[adapter] * (g.T @ x_rows)
        d_b[adapter] = s[adapter] * (dy_rows.T @ (x_rows @ lora_a[adapter].T))
    return dx, d_a, d_b
