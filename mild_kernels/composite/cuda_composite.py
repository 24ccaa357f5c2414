"""The layer composite on the CUDA C++ kernel of csrc/composite.cu (backend="cuda")."""

from __future__ import annotations

from .. import cuda_lib
from .._runtime import empty_like


def cuda_composite_layers(layers, alphas, original, region):
    """Same contract as triton_composite_layers."""
    library = cuda_lib.library(original.device)
    io, out = composite_call(layers, alphas, original, region)
    cuda_lib.call(library.mild_composite_layers, original.device, io)
    return out


def composite_call(layers, alphas, original, region):
    """(MildCompositeIO, out) for one call of the C API; the tensors must outlive the call."""
    out = empty_like(original)
    num_layers, batch, channels = layers.shape[:3]
    io = cuda_lib.CompositeIO(
        layers=layers.data_ptr(), alphas=alphas.data_ptr(), original=original.data_ptr(), region=region.data_ptr(),
        out=out.data_ptr(), num_layers=num_layers, batch=batch, channels=channels,
        pixels=original.shape[2] * original.shape[3],
        dtype=cuda_lib.DTYPE_CODES[original.dtype], mask_dtype=cuda_lib.DTYPE_CODES[region.dtype])
    return io, out
