"""The microbenchmarks' cases under pytest-benchmark: the same problems, providers and grids
as ``python -m benchmarks.bench_attention|bench_lora|bench_step`` (benchmarks/common.py's
harness), timed by pytest-benchmark, one test per (case, provider). See benchmarks/conftest.py
for the commands; the CLI benchmarks stay the source of the committed result files.
"""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import bench_attention, bench_lora, bench_step
from benchmarks.common import DTYPES, on_gpu, run_pytest_benchmark

GPU = on_gpu()
DEVICE = "cuda" if GPU else "cpu"


def _full(config) -> bool:
    shapes = config.getoption("--bench-shapes")
    return shapes != "quick" if shapes else GPU


def _rounds(config) -> int:
    return 20 if _full(config) else 3


def pytest_generate_tests(metafunc):
    full = _full(metafunc.config)
    shapes = metafunc.config.getoption("--bench-shapes")
    args = types.SimpleNamespace(quick=not full, scheduler="dpm++2m",
                                 shapes=shapes if shapes in bench_attention.TRANSFORMER_SHAPES else "sd")
    if "attention_case" in metafunc.fixturenames:
        cases = [(mode, *config) for mode in ("fwd", "fwd+bwd") for config in bench_attention.configurations(args, GPU)]
        metafunc.parametrize("attention_case", cases, ids=lambda c: f"{c[0]}-{c[1].name}-R{c[2]}-blk{c[3]}-{c[4]}")
    if "lora_shape" in metafunc.fixturenames:
        shapes = bench_lora.QUICK_SHAPES if not full else (bench_lora.GPU_SHAPES if GPU else bench_lora.CPU_SHAPES)
        metafunc.parametrize("lora_shape", shapes, ids=lambda s: s.name.replace(" ", "_"))
    if "step_case" in metafunc.fixturenames:
        metafunc.parametrize("step_case", bench_step.step_grid(args, GPU), ids=lambda c: f"L{c[0]}-{c[2]}")
    if "composite_case" in metafunc.fixturenames:
        metafunc.parametrize("composite_case", bench_step.composite_grid(args, GPU), ids=lambda c: f"L{c[0]}-{c[2]}")


def _each_provider(benchmark, request, builders: dict, provider: str, **row):
    """Time one provider; a peer that does not run here (not installed, no GPU, no CPU backward)
    is a skip naming why, as the CLI benchmarks report it and go on."""
    if provider not in builders:
        pytest.skip(f"{provider} does not run here ({'GPU' if GPU else 'CPU'}: {', '.join(builders)})")
    fn = builders[provider]()
    try:
        fn()
    except NotImplementedError as error:
        pytest.skip(f"{provider}: {str(error).splitlines()[0]}")
    run_pytest_benchmark(benchmark, fn, provider=provider, rounds=_rounds(request.config), **row)


ATTENTION_PROVIDERS = ["mild-triton", "mild-torch", "sdpa-mask", "flex", "xformers", "naive", "plain-flash"]


@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
def test_attention(benchmark, request, attention_case, provider):
    mode, shape, regions, blocked, order = attention_case
    dtype_name = "bf16" if GPU else "fp32"
    p = bench_attention.make_problem(shape, regions, blocked, order, DTYPES[dtype_name], DEVICE)
    builders = bench_attention.providers(p, GPU, backward=mode == "fwd+bwd")
    _each_provider(benchmark, request, builders, provider, kernel="sma_attention", mode=mode,
                   x=f"{shape.name} R{regions} blk{int(blocked * 100)}% {order}", dtype=dtype_name)


@pytest.mark.parametrize("provider", ["mild-triton", "mild-torch", "base-gemm", "torch-loop", "peft"])
def test_multi_lora(benchmark, request, lora_shape, provider):
    dtype_name = "bf16" if GPU else "fp32"
    p = bench_lora.make_problem(lora_shape, DTYPES[dtype_name], DEVICE)
    _each_provider(benchmark, request, bench_lora.providers(p, GPU), provider, kernel="multi_lora_linear",
                   mode="fwd", x=lora_shape.name, dtype=dtype_name)


@pytest.mark.parametrize("provider", ["fused-triton", "fused-cuda", "fused-torch", "diffusers-loop",
                                      "diffusers-batched"])
def test_fused_step(benchmark, request, step_case, provider):
    layers, shape, dtype_name = step_case
    dtype = bench_step.DTYPES[dtype_name]
    latents = torch.randn(layers, *shape, device=DEVICE).to(dtype)
    e_u, e_c = (torch.randn(layers, *shape, device=DEVICE).to(dtype) for _ in range(2))
    g = (1.0 + 9.0 * torch.rand(layers)).to(DEVICE)
    functions = bench_step.step_providers("dpm++2m", latents, e_u, e_c, g, GPU)
    builders = {name: (lambda fn=fn: fn) for name, fn in functions.items()}
    _each_provider(benchmark, request, builders, provider, kernel="fused_step", mode="step",
                   x=f"{dtype_name} {'x'.join(map(str, shape))} L{layers}", scheduler="dpm++2m")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_composite(benchmark, request, composite_case, backend):
    from mild_kernels import composite_layers

    layers, (C, H, W), dtype_name = composite_case
    dtype = bench_step.DTYPES[dtype_name]
    stack = torch.rand(layers, 1, C, H, W, device=DEVICE).to(dtype)
    alphas = torch.rand(layers, 1, 1, H, W, device=DEVICE).to(dtype)
    original = torch.rand(1, C, H, W, device=DEVICE).to(dtype)
    region = (torch.rand(1, 1, H, W, device=DEVICE) + 0.01).clamp(max=1).to(dtype)
    run_pytest_benchmark(benchmark, lambda: composite_layers(stack, alphas, original, region, backend=backend),
                         kernel="composite_layers", provider=f"composite-{backend}", mode="fwd",
                         x=f"{dtype_name} {C}x{H}x{W} L{layers}", rounds=_rounds(request.config))
