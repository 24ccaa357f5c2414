"""Triton kernel of the layer composite: one pass, every layer of a pixel in registers.

Program (i, b) handles pixels [i * BLOCK_P, (i + 1) * BLOCK_P) of image b, BLOCK_C
channels at a time. Layers and alphas are loaded only where the region is non-zero, so
pixels outside the erased union cost one region read, one original read and one write.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._runtime import empty_like, interpreting, launch
from ..fused_step.triton_step import rounded_like


@dataclasses.dataclass(frozen=True)
class CompositeConfig:
    block_p: int
    block_c: int
    num_warps: int


COMPOSITE_CONFIG = CompositeConfig(block_p=512, block_c=4, num_warps=4)


@triton.jit
def _composite_kernel(Layers, Alphas, Original, Region, Out, num_layers, batch, channels, pixels,
                      BF16_BY_HAND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = p < pixels
    r = tl.load(Region + b * pixels + p, mask=in_image, other=0.0).to(tl.float32)
    pasted = in_image & (r != 0)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_channels = c[:, None] < channels
        image_offs = (b * channels + c[:, None]) * pixels + p[None, :]
        original = tl.load(Original + image_offs, mask=in_channels & in_image[None, :], other=0.0)
        base = original.to(tl.float32)
        acc = base
        for layer in range(num_layers):
            lb = layer * batch + b
            a = tl.load(Alphas + lb * pixels + p, mask=pasted, other=0.0).to(tl.float32)[None, :]
            v = tl.load(Layers + (lb * channels + c[:, None]) * pixels + p[None, :],
                        mask=in_channels & pasted[None, :], other=0.0).to(tl.float32)
            acc = a * v + (1 - a) * acc
        out = r[None, :] * acc + (1 - r[None, :]) * base
        out = tl.where(pasted[None, :], rounded_like(out, Out, BF16_BY_HAND), original)
        tl.store(Out + image_offs, out, mask=in_channels & in_image[None, :])


def triton_composite_layers(layers, alphas, original, region):
    """Contiguous inputs of the checked shapes; same contract as composite_layers_reference."""
    num_layers, batch, channels = layers.shape[:3]
    pixels = original.shape[2] * original.shape[3]
    out = empty_like(original)
    config = COMPOSITE_CONFIG
    launch(_composite_kernel, (-(-pixels // config.block_p), batch), num_warps=config.num_warps,
           num_stages=1, Layers=layers, Alphas=alphas, Original=original, Region=region, Out=out,
           num_layers=num_layers, batch=batch, channels=channels, pixels=pixels,
           BF16_BY_HAND=interpreting() and original.dtype == torch.bfloat16,
           BLOCK_C=config.block_c, BLOCK_P=config.block_p)
    return out
