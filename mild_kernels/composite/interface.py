"""The public ``composite_layers``: argument checks and backend choice."""

from __future__ import annotations

import torch

from .._backends import check_backend, choose_backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from .reference import composite_layers_reference

MAX_BATCH = 65535  # images ride on the second grid axis of the Triton and CUDA kernels


def composite_layers(layers, alphas, original, region, *, backend="auto"):
    """Composite the decoded layers back to front and paste the result into the original.

    ``C = original``, then for each layer from back to front ``C = a * layer + (1 - a) * C``
    ("over"); the output is ``region * C + (1 - region) * original``, and exactly the
    original (bit for bit) wherever ``region == 0``.

    Args:
        layers: (L, B, C, H, W), back to front; fp16, bf16 or fp32 (float64 on the torch backend).
        alphas: (L, B, 1, H, W) per-layer alpha in [0, 1]; any of those float dtypes.
        original: (B, C, H, W), the photo, in the layers' dtype.
        region: (B, 1, H, W), the feathered erased union in [0, 1], in the alphas' dtype.
        backend: "triton", "cuda" (csrc/, built with ``make -C csrc``), "torch" or "auto".

    Returns:
        (B, C, H, W) in the original's dtype.
    """
    check_backend(backend)
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    check_tensor("layers", layers, ndims=(5,), dtypes=dtypes)
    check_tensor("alphas", alphas, ndims=(5,), dtypes=dtypes)
    check_tensor("original", original, ndims=(4,), dtypes=dtypes)
    check_tensor("region", region, ndims=(4,), dtypes=dtypes)
    L, B, C, H, W = layers.shape
    require(L >= 1 and B >= 1 and C >= 1 and H * W >= 1, f"layers: needs a non-empty (L, B, C, H, W), got "
                                                          f"{tuple(layers.shape)}")
    require(B <= MAX_BATCH, f"layers: {B} images; at most {MAX_BATCH} are supported")
    require(tuple(alphas.shape) == (L, B, 1, H, W),
            f"alphas: shape {tuple(alphas.shape)} must be (L, B, 1, H, W) = {(L, B, 1, H, W)}")
    require(tuple(original.shape) == (B, C, H, W),
            f"original: shape {tuple(original.shape)} must be (B, C, H, W) = {(B, C, H, W)}")
    require(tuple(region.shape) == (B, 1, H, W),
            f"region: shape {tuple(region.shape)} must be (B, 1, H, W) = {(B, 1, H, W)}")
    require(original.dtype == layers.dtype,
            f"original: dtype {original.dtype} must equal the layers' {layers.dtype}")
    require(region.dtype == alphas.dtype, f"region: dtype {region.dtype} must equal the alphas' {alphas.dtype}")
    device = check_same_device(layers=layers, alphas=alphas, original=original, region=region)

    chosen = choose_backend(backend, device)
    if chosen == "torch":
        return composite_layers_reference(layers, alphas, original, region)
    layers, alphas, original, region = (t.contiguous() for t in (layers, alphas, original, region))
    if chosen == "triton":
        from .triton_composite import triton_composite_layers

        return triton_composite_layers(layers, alphas, original, region)
    from .cuda_composite import cuda_composite_layers

    return cuda_composite_layers(layers, alphas, original, region)
