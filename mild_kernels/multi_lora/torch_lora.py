"""The torch backend: the base GEMM for all rows, then the LoRA terms without a loop over rows.

Two layouts, chosen by memory:

- gathered: each batch row takes its adapter's A and B (a gather of rows x rank x (in + out)
  elements), and batched matmuls do every row's shrink and expand at once, the expand
  fused into the add (baddbmm). Rows with id -1 get a zero factor. No Python loop and no
  read of the ids on the host. Used when the gathered weights are no larger than x.
- grouped: otherwise (2-D inputs, few tokens per row), token rows are grouped by adapter
  and each adapter's shrink and expand run once over all of its rows: a loop over the
  adapters present (their ids read on the host), never over rows. Where a host read is not
  free (a GPU), every adapter runs over all token rows with a 0/1 row factor instead: no read.

Any device, any float dtype (float64 included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _runtime


def row_factors(ids: torch.Tensor, scale: float, scales, dtype) -> torch.Tensor:
    """(rows,) the scale of each row's adapter, 0 for id -1."""
    factors = scales[ids.clamp(min=0)] * scale if scales is not None else torch.full(ids.shape, scale,
                                                                                    device=ids.device)
    return torch.where(ids >= 0, factors, 0).to(dtype)


def gathers_adapters(x3: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    rows, tokens, in_features = x3.shape
    rank, out_features = lora_a.shape[1], lora_b.shape[1]
    return rank * (in_features + out_features) <= tokens * in_features


def adapter_groups(ids: torch.Tensor, factors: torch.Tensor, num_adapters: int):
    """(adapter, its token rows or None for all, their factors (n, 1)) for the grouped layout:
    the adapters present, read on the host, or every adapter with the others' factors 0."""
    if not _runtime.host_reads_are_free(ids.device):
        return [(adapter, None, factors * (ids == adapter)[:, None]) for adapter in range(num_adapters)]
    present = torch.unique(ids[ids >= 0]).tolist()
    groups = [(adapter, (ids == adapter).nonzero().squeeze(1)) for adapter in present]
    return [(adapter, indices, factors[indices]) for adapter, indices in groups]


def _rows(x: torch.Tensor, indices) -> torch.Tensor:
    return x if indices is None else x[indices]


def _add_rows(out: torch.Tensor, indices, value: torch.Tensor) -> None:
    if indices is None:
        out.add_(value)
    else:
        out.index_add_(0, indices, value)


def multi_lora_forward_torch(x3, weight, bias, lora_a, lora_b, ids, scale, scales):
    """x3 (rows, T, K) -> (rows, T, N)."""
    y = F.linear(x3, weight, bias)
    factors = row_factors(ids, scale, scales, x3.dtype)
    if gathers_adapters(x3, lora_a, lora_b):
        adapters = ids.clamp(min=0)
        shrink = torch.bmm(x3, lora_a[adapters].transpose(1, 2)) * factors[:, None, None]
        return y.baddbmm_(shrink, lora_b[adapters].transpose(1, 2))
    rows, tokens, K = x3.shape
    x2, y2 = x3.reshape(-1, K), y.view(rows * tokens, -1)
    token_ids = ids.repeat_interleave(tokens)
    token_factors = factors.repeat_interleave(tokens)[:, None]
    for adapter, indices, s in adapter_groups(token_ids, token_factors, lora_a.shape[0]):
        lora = F.linear(F.linear(_rows(x2, indices), lora_a[adapter]), lora_b[adapter])
        _add_rows(y2, indices, lora * s)
    return y


def multi_lora_backward_torch(grad_y, x3, weight, lora_a, lora_b, ids, scale, scales):
    """(dx, dA, dB) for x3 (rows, T, K) and grad_y (rows, T, N)."""
    factors = row_factors(ids, scale, scales, x3.dtype)
    dx = grad_y @ weight
    if gathers_adapters(x3, lora_a, lora_b):
        adapters = ids.clamp(min=0)
        a_rows, b_rows = lora_a[adapters], lora_b[adapters]
        g = torch.bmm(grad_y, b_rows) * factors[:, None, None]  # s dy B: the gradient of the shrink
        shrink = torch.bmm(x3, a_rows.transpose(1, 2)) * factors[:, None, None]  # s x A^T
        dx.baddbmm_(g, a_rows)
        # Per-row gradients summed into their adapters by a (adapters x rows) one-hot matmul.
        owner = (F.one_hot(adapters.long(), lora_a.shape[0]) * (ids >= 0)[:, None]).T.to(x3.dtype)
        d_a = (owner @ torch.bmm(g.transpose(1, 2), x3).flatten(1)).view(lora_a.shape)
        d_b = (owner @ torch.bmm(grad_y.transpose(1, 2), shrink).flatten(1)).view(lora_b.shape)
        return dx, d_a, d_b
    rows, tokens, K = x3.shape
    x2, dy2, dx2 = x3.reshape(-1, K), grad_y.reshape(rows * tokens, -1), dx.view(rows * tokens, K)
    token_ids = ids.repeat_interleave(tokens)
    token_factors = factors.repeat_interleave(tokens)[:, None]
    d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    for adapter, indices, s in adapter_groups(token_ids, token_factors, lora_a.shape[0]):
        x_rows, dy_rows = _rows(x2, indices), _rows(dy2, indices)
        g = (dy_rows @ lora_b[adapter]) * s
        _add_rows(dx2, indices, g @ lora_a[adapter])
        d_a[adapter] = g.T @ x_rows
        d_b[adapter] = dy_rows.T @ (F.linear(x_rows, lora_a[adapter]) * s)
    return dx, d_a, d_b
