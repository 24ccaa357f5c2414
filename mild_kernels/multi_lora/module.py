"""nn.Module face of the multi-adapter LoRA layer, and helpers for diffusers UNets.

    unet = UNet2DConditionModel(...)
    apply_multi_lora(unet, num_adapters=2, rank=8)   # to_q, to_k, to_v, to_out[0] of every attention
    apply_multi_lora(flux, 2, 8, mlp=True)           # a transformer: joint attention and feed-forward too
    set_adapter_ids(unet, [0, 1, 0, 1])              # one id per row of the next UNet batch
    unet(latents, t, text)                           # each row runs through its own adapter
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from .._checks import require
from .interface import multi_lora_linear
from .op import remember_id_range

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")  # and to_out[0]
JOINT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # text side of joint attention
FEED_FORWARDS = ("ff", "ff_context")  # diffusers FeedForward modules: every Linear inside
SINGLE_BLOCK_MLP = ("proj_mlp", "proj_out")  # FLUX's single-stream blocks (the modules with a proj_mlp)

class MultiLoRALinear(nn.Module):
    """An nn.Linear plus ``num_adapters`` LoRA adapters, one chosen per batch row.

    ``y[i] = base(x[i]) + scaling[id_i] (x[i] A[id_i]^T) B[id_i]^T``, with the ids set by
    :func:`set_adapter_ids` (or :meth:`set_adapter_ids`); id -1, or no ids set, gives the
    base layer alone. The base layer is frozen, as in LoRA training. Like peft, A starts
    Kaiming-uniform and B at zero, so a fresh layer equals its base.

    Args:
        base: the nn.Linear to wrap (kept as ``self.base``; its parameters are not copied).
        num_adapters, rank: the adapter count and their rank.
        scaling: one float for every adapter (peft's ``lora_alpha / r``), or one per adapter.
        backend: passed to :func:`multi_lora_linear`.
    """

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int,
                 scaling: Union[float, Sequence[float]] = 1.0, backend: str = "auto"):
        super().__init__()
        require(isinstance(base, nn.Linear), f"base: expected an nn.Linear, got {type(base).__name__}")
        require(num_adapters >= 1, f"num_adapters: must be >= 1, got {num_adapters}")
        require(rank >= 1, f"rank: must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.num_adapters, self.rank, self.backend = num_adapters, rank, backend
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(num_adapters, rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(num_adapters, base.out_features, rank, **factory))
        for adapter in self.lora_a:
            nn.init.kaiming_uniform_(adapter, a=math.sqrt(5))
        if isinstance(scaling, (int, float)):
            self.scaling = float(scaling)
        else:
            scales = torch.as_tensor(scaling, dtype=torch.float32, device=base.weight.device)
            require(tuple(scales.shape) == (num_adapters,),
                    f"scaling: expected a float or {num_adapters} per-adapter values, got shape {tuple(scales.shape)}")
            self.register_buffer("scaling", scales)
        self.register_buffer("adapter_ids", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # diffusers reads attn.to_q.weight for the dtype and device
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_adapter_ids(self, adapter_ids) -> None:
        """Set the per-row adapter ids used by the following forward calls (None: base layer only)."""
        set_adapter_ids(self, adapter_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_ids is None:
            return self.base(x)
        rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 3 else x
        y = multi_lora_linear(rows, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.adapter_ids,
                              self.scaling, backend=self.backend)
        return y.reshape(*x.shape[:-1], y.shape[-1]) if x.dim() > 3 else y

    def extra_repr(self) -> str:
        return f"num_adapters={self.num_adapters}, rank={self.rank}, backend={self.backend!r}"


def apply_multi_lora(model: nn.Module, num_adapters: int, rank: int, scaling: Union[float, Sequence[float]] = 1.0,
                     backend: str = "auto", mlp: bool = False) -> list[str]:
    """Wrap the linear layers of ``model``'s attention (and, with ``mlp``, its feed-forward
    networks) in MultiLoRALinear.

    - Attention: to_q, to_k, to_v and to_out[0] of every module that has them (diffusers'
      ``Attention``, FLUX's ``FluxAttention``), and the text side of joint attention where
      present (add_q_proj, add_k_proj, add_v_proj, to_add_out: FLUX's and SD3's blocks).
    - ``mlp=True``: every Linear of the ``ff`` / ``ff_context`` feed-forward modules, and
      proj_mlp / proj_out of FLUX's single-stream blocks.

    Works on diffusers UNets and diffusion transformers (FLUX.1, SD3). Returns the wrapped
    layers' names; layers already wrapped are left as they are.
    """
    wrapped = []

    def wrap(parent: nn.Module, attr: str, name: str) -> None:
        layer = getattr(parent, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(parent, attr, MultiLoRALinear(layer, num_adapters, rank, scaling, backend))
            wrapped.append(name)

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, MultiLoRALinear):
            continue
        if all(hasattr(module, attr) for attr in ATTENTION_PROJECTIONS):  # FLUX's single-stream ones lack to_out
            for attr in ATTENTION_PROJECTIONS + JOINT_PROJECTIONS:
                wrap(module, attr, prefix + attr)
            if isinstance(getattr(module, "to_out", None), nn.ModuleList) and len(module.to_out):
                wrap(module.to_out, "0", prefix + "to_out.0")
        if not mlp:
            continue
        if hasattr(module, "proj_mlp"):
            for attr in SINGLE_BLOCK_MLP:
                wrap(module, attr, prefix + attr)
        for attr in FEED_FORWARDS:
            network = getattr(module, attr, None)
            if not isinstance(network, nn.Module):
                continue
            for inner, parent in list(network.named_modules()):
                if isinstance(parent, MultiLoRALinear):
                    continue
                for child, layer in list(parent.named_children()):
                    if isinstance(layer, nn.Linear):
                        wrap(parent, child, ".".join(filter(None, (prefix + attr, inner, child))))
    require(bool(wrapped), f"model: found no unwrapped attention projections ({', '.join(ATTENTION_PROJECTIONS)}, "
                           "to_out[0]) in this model")
    return wrapped


def set_adapter_ids(model: nn.Module, adapter_ids) -> None:
    """Set the per-row adapter ids of every MultiLoRALinear in ``model`` for the following calls.

    ``adapter_ids``: a sequence or 1-D integer tensor with one id per row of the batch the
    layers will see (-1: no adapter), or None to run the base layers alone. The ids are
    checked here, once, so the layers never read them back from the device.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    require(bool(layers), "model: has no MultiLoRALinear layers; call apply_multi_lora first")
    if adapter_ids is None:
        for layer in layers:
            layer.adapter_ids = None
        return
    ids = torch.as_tensor(adapter_ids).to("cpu")
    require(ids.dim() == 1 and not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool,
            f"adapter_ids: expected a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.long()
    low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (-1, -1)
    fewest = min(layer.num_adapters for layer in layers)
    require(low >= -1 and high < fewest,
            f"adapter_ids: ids must lie in [-1, {fewest - 1}] for layers with {fewest} adapters; got values from "
            f"{low} to {high}")
    on_device = {}
    for layer in layers:
        device = layer.lora_a.device
        if device not in on_device:
            on_device[device] = ids.to(device)
            remember_id_range(on_device[device], low, high)
        layer.adapter_ids = on_device[device]
