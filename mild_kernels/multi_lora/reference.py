"""The multi-adapter LoRA linear layer written plainly: one row at a time.

    y[i] = x[i] W^T + bias + s[id_i] (x[i] A[id_i]^T) B[id_i]^T,   id_i = -1: no adapter

Tests run it on float64 copies of the inputs, through autograd for the gradients.
"""

from __future__ import annotations

import torch


def multi_lora_linear_reference(x, weight, bias, lora_a, lora_b, adapter_ids, scaling=1.0):
    rows = x if x.dim() == 3 else x[:, None]
    out = []
    for row, adapter in zip(rows, adapter_ids.tolist()):
        y = row @ weight.T
        if bias is not None:
            y = y + bias
        if adapter >= 0:
            s = scaling[adapter] if isinstance(scaling, torch.Tensor) else scaling
            y = y + s * (row @ lora_a[adapter].T) @ lora_b[adapter].T
        out.append(y)
    y = torch.stack(out)
    return y if x.dim() == 3 else y[:, 0]
