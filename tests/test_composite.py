"""composite_layers against a float64 evaluation of its reference; the outside-region invariance."""

import pytest
import torch

from conftest import DEVICE
from csrc_build import emulate_cuda_backend
from helpers import assert_close
from mild_kernels import composite_layers
from mild_kernels._runtime import poison_outputs, record_launches
from mild_kernels.composite import composite_layers_reference

GPU = DEVICE == "cuda"
BACKENDS = ["triton", "torch", "cuda-host"] + (["cuda"] if GPU else [])
BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(params=BACKENDS)
def impl(request, monkeypatch):
    """(backend, device): "cuda-host" runs csrc/'s element code on the host (tests/csrc_build.py)."""
    if request.param == "cuda-host":
        emulate_cuda_backend(monkeypatch)
        return "cuda", "cpu"
    return request.param, DEVICE


def make_inputs(L, B, C, H, W, dtype, mask_dtype, device, outside=0.5):
    layers = torch.randn(L, B, C, H, W, device=device).to(dtype)
    alphas = torch.rand(L, B, 1, H, W, device=device).to(mask_dtype)
    original = torch.randn(B, C, H, W, device=device).to(dtype)
    region = torch.rand(B, 1, H, W, device=device)
    region[region < outside] = 0  # the rest is feathered, in (0, 1)
    return layers, alphas, original, region.to(mask_dtype)


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("L,B,C,H,W", [(1, 1, 3, 5, 7), (3, 2, 3, 37, 29), (4, 1, 5, 8, 9), (2, 3, 4, 1, 1)])
def test_matches_float64_reference(L, B, C, H, W, dtype, mask_dtype, impl):
    backend, device = impl
    inputs = make_inputs(L, B, C, H, W, dtype, mask_dtype, device)
    out = composite_layers(*inputs, backend=backend)
    assert out.dtype == dtype
    truth = composite_layers_reference(*(t.double() for t in inputs))
    assert_close(f"composite {backend}", out, truth, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outside_the_region_the_output_is_the_original_bit_for_bit(dtype, impl):
    backend, device = impl
    layers, alphas, original, region = make_inputs(3, 2, 3, 19, 23, dtype, dtype, device, outside=0.6)
    region[:, :, :4] = -0.0  # negative zero is zero too
    outside = (region == 0).expand_as(original)
    # Whatever the layers hold outside the region is never read into the output.
    layers[:, outside] = float("nan")
    alphas[:, (region == 0)] = float("inf")
    original[:, :, 0, 0] = -0.0
    out = composite_layers(layers, alphas, original, region, backend=backend)
    bits = BIT_VIEW[dtype]
    assert torch.equal(out[outside].view(bits), original[outside].view(bits))
    assert not out[~outside].isnan().any()


def test_every_output_element_is_written(impl):
    backend, device = impl
    inputs = make_inputs(2, 2, 5, 17, 41, torch.float16, torch.float32, device)
    with poison_outputs():
        out = composite_layers(*inputs, backend=backend)
    assert not out.isnan().any()


def test_one_launch_for_all_layers_and_images():
    inputs = make_inputs(8, 2, 3, 16, 16, torch.float16, torch.float16, "cpu")
    with record_launches() as launches:
        composite_layers(*inputs, backend="triton")
    assert len(launches) == 1


def test_bad_arguments_raise_value_errors_naming_the_argument():
    layers, alphas, original, region = make_inputs(2, 1, 3, 4, 4, torch.float32, torch.float32, "cpu")
    cases = [
        (lambda: composite_layers(layers[0], alphas, original, region), "^layers: expected 5 dims"),
        (lambda: composite_layers(layers, alphas[:, :, :, :2], original, region), "^alphas: shape"),
        (lambda: composite_layers(layers, alphas, original[:, :2], region), "^original: shape"),
        (lambda: composite_layers(layers, alphas, original, region.expand(1, 3, 4, 4)), "^region: shape"),
        (lambda: composite_layers(layers, alphas, original.half(), region), "^original: dtype"),
        (lambda: composite_layers(layers, alphas, original, region.half()), "^region: dtype"),
        (lambda: composite_layers(layers.int(), alphas, original.int(), region), "^layers: dtype"),
        (lambda: composite_layers(layers[:0], alphas[:0], original, region), "^layers: needs a non-empty"),
        (lambda: composite_layers(layers, alphas, original, region, backend="numpy"), "^backend: must be one of"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.skipif(GPU, reason="checks the message on machines without a CUDA device")
def test_cuda_backend_says_it_is_unavailable_without_a_gpu():
    inputs = make_inputs(1, 1, 3, 4, 4, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="^backend: 'cuda' is unavailable: "):
        composite_layers(*inputs, backend="cuda")
