"""Every op on inputs of any strides: transposed, sliced, expanded (stride 0), permuted.

The kernels read rows with unit-stride columns; a tensor whose last dim is strided must be
copied once (or read through its strides), never read as if it were dense. Each case
compares the strided call with a float64 evaluation of the reference on the same values.
"""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from conftest import DEVICE
from helpers import assert_close
from mild_kernels import FusedStep, composite_layers, multi_lora_linear, sma_attention, sma_attention_reference
from mild_kernels.composite import composite_layers_reference
from mild_kernels.multi_lora.reference import multi_lora_linear_reference
from mild_kernels._runtime import poison_outputs

BACKENDS = ["torch", "triton"]


def strided(shape, kind, device=DEVICE, dtype=torch.float32):
    """A tensor of ``shape`` (last two dims (N, D)) whose memory layout is ``kind``."""
    *lead, n, d = shape
    if kind == "transposed":  # last-dim stride N: the case that was read as dense
        return torch.randn(*lead, d, n, device=device, dtype=dtype).transpose(-1, -2)
    if kind == "sliced":  # every other column
        return torch.randn(*lead, n, 2 * d, device=device, dtype=dtype)[..., ::2]
    if kind == "narrowed":  # unit last stride, row stride d + 8
        return torch.randn(*lead, n, d + 8, device=device, dtype=dtype)[..., 3:d + 3]
    if kind == "expanded":  # leading stride 0
        return torch.randn(1, *lead[1:], n, d, device=device, dtype=dtype).expand(*shape)
    if kind == "permuted":  # (B, N, H, D) seen as (B, H, N, D): how a UNet's heads arrive
        return torch.randn(lead[0], n, *lead[1:], d, device=device, dtype=dtype).transpose(1, 2)
    raise ValueError(kind)


KINDS = ["transposed", "sliced", "narrowed", "expanded", "permuted"]


def leaf(t, dtype=None):
    """A leaf with t's strides (detach keeps them), optionally in another dtype (float64: dense)."""
    return (t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_sma_attention_any_strides_forward_and_backward(kind, backend, soft):
    B, H, Nq, Nk, D, R = 2, 3, 80, 70, 40, 3
    q = strided((B, H, Nq, D), kind)
    k, v = strided((B, H, Nk, D), kind), strided((B, H, Nk, D), kind)
    if soft:
        q_regions = torch.softmax(3 * torch.randn(B, Nq, R), -1)
        k_regions = torch.softmax(3 * torch.randn(Nk, R), -1)
    else:
        # Region-sorted queries: the torch backend's region-pair path then reads q without a gather.
        q_regions, k_regions = torch.randint(0, R, (B, Nq)).sort(-1).values, torch.randint(0, R, (Nk,))
    # The bias, allow and labels strided too: a transposed table and a sliced allow.
    bias = torch.randn(H, R, R).transpose(-1, -2)
    allow = (torch.rand(B, R, 2 * R) > 0.3)[..., ::2]
    allow[:, 0, 0] = True
    inputs = [leaf(t) for t in (q, k, v, bias)]
    with poison_outputs():
        got = sma_attention(*inputs[:3], q_regions, k_regions, inputs[3], allow, return_lse=True, backend=backend)
    grad = torch.randn(B, H, Nq, D)
    (got.out * grad).sum().backward()
    refs = [leaf(t, torch.float64) for t in (q, k, v, bias)]
    out, lse, _ = sma_attention_reference(*refs[:3], q_regions, k_regions, refs[3], allow, return_lse=True)
    (out * grad.double()).sum().backward()
    assert_close("out", got.out, out, torch.float32)
    assert_close("lse", got.lse, lse, torch.float32)
    for name, mine, ref in zip(("dq", "dk", "dv", "dbias"), inputs, refs):
        assert mine.grad.shape == ref.shape
        assert_close(name, mine.grad, ref.grad, torch.float32, factor=4)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_linear_any_strides_forward_and_backward(kind, backend):
    rows, tokens, fin, fout, adapters, rank = 3, 37, 48, 40, 2, 8
    x = strided((rows, tokens, fin), kind)
    weight = strided((fout, fin), kind if kind != "expanded" else "transposed")
    lora_a = strided((adapters, rank, fin), kind)
    lora_b = strided((adapters, fout, rank), "sliced")
    bias = torch.randn(2 * fout)[::2]
    ids = torch.tensor([1, -1, 0])
    inputs = [leaf(t) for t in (x, weight, bias, lora_a, lora_b)]
    with poison_outputs():
        y = multi_lora_linear(*inputs, ids, 0.7, backend=backend)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    refs = [leaf(t, torch.float64) for t in (x, weight, bias, lora_a, lora_b)]
    (multi_lora_linear_reference(*refs, ids, 0.7) * grad.double()).sum().backward()
    assert_close("y", y, multi_lora_linear_reference(*refs, ids, 0.7), torch.float32)
    for name, mine, ref in zip(("dx", "dweight", "dbias", "dA", "dB"), inputs, refs):
        assert_close(name, mine.grad, ref.grad, torch.float32, factor=4)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_composite_layers_any_strides(kind, backend):
    L, B, C, H, W = 3, 2, 3, 11, 13
    layers = strided((L, B, C, H, W), kind)
    alphas = strided((L, B, 1, H, W), kind).sigmoid()
    original = strided((B, C, H, W), kind)
    region = strided((B, 1, H, W), kind).sigmoid()
    with poison_outputs():
        out = composite_layers(layers, alphas, original, region, backend=backend)
    ref = composite_layers_reference(*(t.double() for t in (layers, alphas, original, region)))
    assert_close("composite", out, ref, torch.float32)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler], ids=["ddim", "euler"])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_any_strides(scheduler, kind, backend):
    """A strided step gives bit for bit what the same values give dense (the dense path is
    checked against diffusers' step() in test_fused_step.py)."""
    shape = (4, 4, 9, 7)
    inputs = [strided(shape, kind) for _ in range(3)]
    guidance = torch.full((8,), 3.0)[::2]  # a strided per-row tensor
    steps = []
    for tensors in (inputs, [t.contiguous() for t in inputs]):
        sched = scheduler()
        sched.set_timesteps(10)
        step = FusedStep(sched, backend=backend)
        with poison_outputs():
            steps.append(step.step(*tensors[:2], sched.timesteps[3], tensors[2], guidance))
    assert torch.equal(steps[0], steps[1])
