"""What every benchmark shares: timing, one row schema, result files and plots.

Every benchmark writes rows of one shape (as Liger-Kernel's benchmarks do):

    kernel, provider, mode, metric, x, q20, q50, q80, params, device, torch, triton,
    mild_kernels, date, commit

to ``benchmarks/results/<device>/<benchmark>.json``, and draws them with
:func:`plot_rows`. Times are quantiles over repeats: CUDA events through
``triton.testing.do_bench`` on a GPU, ``time.perf_counter`` on the CPU.

The same cases also run under pytest-benchmark (benchmarks/test_microbenchmarks.py,
through :func:`run_pytest_benchmark`): ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTILES = (0.2, 0.5, 0.8)


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def device_name() -> str:
    if on_gpu():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} x{os.cpu_count()}"


def device_slug() -> str:
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-") if on_gpu() else "cpu"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import mild_kernels

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": device_name(), "torch": torch.__version__, "triton": triton_version,
            "mild_kernels": mild_kernels.__version__, "date": datetime.date.today().isoformat(), "commit": commit}


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    if len(samples_ms) == 1:
        return (samples_ms[0],) * 3
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles
    return cuts[1], statistics.median(samples_ms), cuts[7]


def synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a device sync on a GPU, so a wall-clock timer sees the kernels' time."""
    if not on_gpu():
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def run_pytest_benchmark(benchmark, fn: Callable[[], object], *, kernel: str, provider: str, mode: str, x: str,
                         rounds: int, **params) -> None:
    """One case through pytest-benchmark's fixture: the shared row schema's fields go into
    ``extra_info`` (so --benchmark-json carries them) and the timing is pytest-benchmark's."""
    benchmark.group = f"{kernel} {mode} {x}"
    benchmark.extra_info.update(kernel=kernel, provider=provider, mode=mode, x=x, params=params, **environment())
    benchmark.pedantic(synchronized(fn), warmup_rounds=1, rounds=rounds, iterations=1)


def time_ms(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
            gpu_warmup_ms: float = 25, gpu_rep_ms: float = 100) -> tuple[float, float, float]:
    """(q20, median, q80) milliseconds of ``fn()``."""
    if on_gpu():
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, quantiles=list(QUANTILES)))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return _quantiles(samples)


class Results:
    """Rows of the shared schema for one benchmark, written as one JSON file."""

    def __init__(self, benchmark: str):
        self.benchmark = benchmark
        self.env = environment()
        self.rows: list[dict] = []

    def add(self, *, kernel: str, provider: str, mode: str, metric: str, x: str, value=None,
            quantiles=None, **params) -> dict:
        q20, q50, q80 = quantiles if quantiles is not None else (value, value, value)
        row = {"kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "x": x,
               "q20": q20, "q50": q50, "q80": q80, "params": params, **self.env}
        self.rows.append(row)
        return row

    def write(self, directory: Path | None = None) -> Path:
        directory = directory or RESULTS / device_slug()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.benchmark}.json"
        path.write_text(json.dumps(self.rows, indent=1))
        return path


def plot_rows(rows: list[dict], metric: str, path: Path, *, title: str, log: bool = False) -> Path | None:
    """Grouped bars of one metric's median by x, one bar per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    chosen = [r for r in rows if r["metric"] == metric and r["q50"] is not None]
    if not chosen:
        return None
    xs = list(dict.fromkeys(r["x"] for r in chosen))
    providers = list(dict.fromkeys(r["provider"] for r in chosen))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(xs) * max(1, len(providers) / 2)), 4.5))
    for i, provider in enumerate(providers):
        values = {r["x"]: r for r in chosen if r["provider"] == provider}
        pos = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(xs))]
        med = [values[x]["q50"] if x in values else 0 for x in xs]
        low = [values[x]["q50"] - values[x]["q20"] if x in values else 0 for x in xs]
        high = [values[x]["q80"] - values[x]["q50"] if x in values else 0 for x in xs]
        ax.bar(pos, med, width, yerr=[low, high], label=provider, capsize=2)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{title}\n{rows[0]['device']}, {rows[0]['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
