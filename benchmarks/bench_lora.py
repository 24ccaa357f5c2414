"""Multi-adapter LoRA linear against per-adapter loops and the base GEMM alone.

Every provider computes ``y = x W^T + b + s (x A[id]^T) B[id]^T`` per row, for a batch
whose rows alternate between two adapters (MILD's background and foreground LoRAs, with
both classifier-free-guidance halves):

- ``mild-triton`` / ``mild-torch``: multi_lora_linear (the fused kernel on a GPU, the
  rows-grouped torch backend on the CPU);
- ``torch-loop``: the base linear, then per adapter a gather of its rows, the two LoRA
  matmuls and an index_add (row indices built outside the timing);
- ``peft``: peft's LoRA layer with per-row ``adapter_names`` (its mixed-batch forward,
  a loop over adapters), where peft is installed;
- ``base-gemm``: F.linear alone: the floor every provider is measured against.

Reports ms and ``ratio_to_base`` (time / base GEMM time) and writes
benchmarks/results/<device>/lora.json with plots.

    python -m benchmarks.bench_lora            # GPU: SD shapes, 4096 tokens; CPU: smaller shapes
    python -m benchmarks.bench_lora --quick    # tiny shapes, a smoke test of the harness
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from benchmarks.common import DTYPES, Results, device_slug, on_gpu, plot_rows, time_ms  # noqa: E402
from mild_kernels import multi_lora_linear  # noqa: E402



@dataclasses.dataclass(frozen=True)
class Shape:
    rows: int
    tokens: int
    in_features: int
    out_features: int
    rank: int

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.tokens} {self.in_features}->{self.out_features} r{self.rank}"


# SD 1.5 at 512 px: 4096 tokens at 320 channels, with the wider projections of the deeper blocks
# at the same token count so every width is measured at the shape; rows = 2 layers x CFG.
SD_WIDTHS = [(320, 320), (640, 640), (1280, 1280)]
RANKS = [4, 16, 64]
GPU_SHAPES = [Shape(4, 4096, i, o, r) for i, o in SD_WIDTHS for r in RANKS]
CPU_SHAPES = [Shape(4, 1024, i, o, r) for i, o in SD_WIDTHS[:2] for r in RANKS]
QUICK_SHAPES = [Shape(2, 64, 64, 96, 4)]
ADAPTERS = 2
SCALING = 1.0  # peft's lora_alpha / r with lora_alpha = r


@dataclasses.dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ids: torch.Tensor


def make_problem(shape: Shape, dtype, device) -> Problem:
    gen = torch.Generator().manual_seed(0)
    K, N, r = shape.in_features, shape.out_features, shape.rank

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=gen)).to(dtype).to(device)

    ids = torch.arange(shape.rows) % ADAPTERS
    return Problem(randn(shape.rows, shape.tokens, K), randn(N, K, scale=K ** -0.5), randn(N),
                   randn(ADAPTERS, r, K, scale=K ** -0.5), randn(ADAPTERS, N, r, scale=r ** -0.5), ids.to(device))


def gemm_flops(shape: Shape) -> float:
    return 2.0 * shape.rows * shape.tokens * shape.in_features * shape.out_features


def mild_provider(p: Problem, backend: str):
    return lambda: multi_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.ids, SCALING, backend=backend)


def base_provider(p: Problem):
    return lambda: F.linear(p.x, p.weight, p.bias)


def torch_loop_provider(p: Problem):
    groups = [(a, (p.ids == a).nonzero().squeeze(1)) for a in range(ADAPTERS)]

    def run():
        y = F.linear(p.x, p.weight, p.bias)
        for adapter, rows in groups:
            lora = (p.x.index_select(0, rows) @ p.lora_a[adapter].T) @ p.lora_b[adapter].T
            y.index_add_(0, rows, lora, alpha=SCALING)
        return y

    return run


class _Projection(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_provider(p: Problem):
    from peft import LoraConfig, get_peft_model

    N, K = p.weight.shape
    rank = p.lora_a.shape[1]
    linear = torch.nn.Linear(K, N, device=p.x.device, dtype=p.x.dtype)
    with torch.no_grad():
        linear.weight.copy_(p.weight)
        linear.bias.copy_(p.bias)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"])
    model = get_peft_model(_Projection(linear), config, adapter_name="adapter0")
    for adapter in range(1, ADAPTERS):
        model.add_adapter(f"adapter{adapter}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for adapter in range(ADAPTERS):
            layer.lora_A[f"adapter{adapter}"].weight.copy_(p.lora_a[adapter])
            layer.lora_B[f"adapter{adapter}"].weight.copy_(p.lora_b[adapter])
    model = model.to(p.x.dtype).eval()  # peft takes adapter_names in eval mode only
    names = [f"adapter{a}" for a in p.ids.tolist()]
    return lambda: model(p.x, adapter_names=names)


def providers(p: Problem, gpu: bool) -> dict:
    chosen = {"mild-triton": lambda: mild_provider(p, "triton")} if gpu else {
        "mild-torch": lambda: mild_provider(p, "torch")}
    chosen.update({"base-gemm": lambda: base_provider(p), "torch-loop": lambda: torch_loop_provider(p)})
    try:
        import peft  # noqa: F401

        chosen["peft"] = lambda: peft_provider(p)
    except ImportError:
        pass
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, claims nothing")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--providers", nargs="*", help="only these providers")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repeats per timing")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if gpu else CPU_SHAPES)
    results = Results("lora")
    for shape in tqdm(shapes, desc="lora", unit="shape"):
        p = make_problem(shape, DTYPES[dtype_name], device)
        expected = mild_provider(p, "torch")()
        params = dict(shape=dataclasses.asdict(shape), adapters=ADAPTERS, dtype=dtype_name)
        times = {}
        for name, build in providers(p, gpu).items():
            if args.providers and name not in args.providers and name != "base-gemm":
                continue
            try:
                fn = build()
                if name != "base-gemm":  # every provider must compute the same thing
                    error = ((fn() - expected).float().norm() / expected.float().norm()).item()
                    assert error < 1e-2, f"relative error {error:.2e} against the torch backend"
                q = time_ms(fn, repeats=1 if args.quick else args.repeats)
            except Exception as error:  # a peer that cannot run this shape is reported, not fatal
                tqdm.write(f"{shape.name}: {name} failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            times[name] = q
            results.add(kernel="multi_lora_linear", provider=name, mode="fwd", metric="ms", x=shape.name,
                        quantiles=q, **params)
            results.add(kernel="multi_lora_linear", provider=name, mode="fwd", metric="base_gemm_tflops",
                        x=shape.name, quantiles=tuple(gemm_flops(shape) / (t * 1e-3) / 1e12 for t in reversed(q)),
                        **params)
        for name, q in times.items():
            if name != "base-gemm" and "base-gemm" in times:
                results.add(kernel="multi_lora_linear", provider=name, mode="fwd", metric="ratio_to_base",
                            x=shape.name, value=q[1] / times["base-gemm"][1], **params)
        line = "  ".join(f"{n}={t[1]:.3f}ms" + (f" ({t[1] / times['base-gemm'][1]:.2f}x)" if "base-gemm" in times
                                                 else "") for n, t in times.items())
        tqdm.write(f"{shape.name}: {line}")

    out_dir = args.out or (Path(__file__).resolve().parent / "results" / ("quick" if args.quick else device_slug()))
    path = results.write(out_dir)
    plots = [plot_rows(results.rows, metric, out_dir / f"lora_{metric}.png", title=f"multi_lora_linear fwd, {dtype_name}",
                       log=log) for metric, log in (("ms", True), ("ratio_to_base", False))]
    print(f"wrote {path}" + "".join(f" and {plot}" for plot in plots if plot))
    return results


if __name__ == "__main__":
    main()
