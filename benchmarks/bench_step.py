"""The fused multi-layer denoising step and the layer composite against diffusers.

Step providers, each computing the same CFG + scheduler step for all L layers:

- ``fused-triton``: FusedStep's Triton kernel (GPU; on the CPU, Triton's interpreter);
- ``fused-cuda``: FusedStep's CUDA C++ kernel (GPU, once ``make -C csrc`` has built it);
- ``fused-torch``: FusedStep's torch backend (the reference: a handful of whole-batch ops);
- ``diffusers-loop``: what a sequential pipeline does, CFG then ``scheduler.step`` once per layer,
  each layer with its own scheduler;
- ``diffusers-batched``: CFG and one ``scheduler.step`` over all layers at once (the strongest
  peer: it only works when every layer shares the timestep, as here).

Reports ms, effective GB/s (the bytes a single pass must move, divided by the time, for
every provider), that GB/s as a fraction of the measured device copy bandwidth, launches
per step (device kernels on a GPU; on the CPU, aten ops that produce more than a scalar
plus Triton launches) and the speedup of the fused step. Then the composite kernel's GB/s.
Writes benchmarks/results/<device>/step.json and plots.

    python -m benchmarks.bench_step                      # CPU: small sizes; GPU: the issue's grid
    python -m benchmarks.bench_step --quick              # tiny shapes, a smoke test of the harness
    python -m benchmarks.bench_step --scheduler euler    # ddim, euler, dpm++2m (default) or flow
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU runs interpret

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from benchmarks.common import Results, device_slug, on_gpu, plot_rows, time_ms  # noqa: E402
from mild_kernels import FusedStep, composite_layers, cuda_lib  # noqa: E402
from mild_kernels._runtime import record_launches  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS, MID_RUN = 20, 10  # the step timed: mid-run, where DPM-Solver++ is second order


def make_scheduler(name):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    return {
        "dpm++2m": lambda: DPMSolverMultistepScheduler(**SD),
        "ddim": lambda: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "euler": lambda: EulerDiscreteScheduler(**SD),
        "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    }[name]()


# Tensors a single pass reads and writes per latent element: e_u, e_c, x in and x out,
# plus DPM-Solver++'s previous x0 in and this step's x0 out.
ACCESSES = {"dpm++2m": 6, "ddim": 4, "euler": 4, "flow": 4}


class MidRun:
    """A scheduler advanced to step MID_RUN, and a way to put it back there before every timed call."""

    def __init__(self, scheduler, latents: torch.Tensor):
        scheduler.set_timesteps(STEPS, device=latents.device)
        x = latents.clone()
        for t in scheduler.timesteps[:MID_RUN]:
            x = scheduler.step(torch.randn_like(x), t, x).prev_sample
        self.scheduler = scheduler
        self.timestep = scheduler.timesteps[MID_RUN]
        self.step_index = getattr(scheduler, "_step_index", None)
        self.lower_order_nums = getattr(scheduler, "lower_order_nums", None)
        self.model_outputs = list(getattr(scheduler, "model_outputs", []))

    def layer(self, index: int) -> "MidRun":
        """This state for one layer's own scheduler (a sequential pipeline keeps one per layer)."""
        single = copy.copy(self)
        single.scheduler = copy.deepcopy(self.scheduler)
        single.model_outputs = [None if h is None else h[index:index + 1] for h in self.model_outputs]
        single.restore()
        return single

    def restore(self):
        if self.step_index is not None:
            self.scheduler._step_index = self.step_index
        if self.lower_order_nums is not None:
            self.scheduler.lower_order_nums = self.lower_order_nums
            self.scheduler.model_outputs = list(self.model_outputs)


def step_providers(name, latents, e_u, e_c, g, gpu):
    """{provider: zero-argument callable doing one step for all layers}."""
    L = latents.shape[0]
    providers = {}

    def fused(backend):
        state = MidRun(make_scheduler(name), latents)
        fused_step = FusedStep(state.scheduler, backend=backend)

        def run():
            state.restore()
            return fused_step.step(e_u, e_c, state.timestep, latents, g)

        return run

    if gpu:
        providers["fused-triton"] = fused("triton")
        if cuda_lib.unavailable_reason(latents.device) is None:
            providers["fused-cuda"] = fused("cuda")
    else:
        providers["fused-triton"] = fused("triton")
    providers["fused-torch"] = fused("torch")

    batched_state = MidRun(make_scheduler(name), latents)
    layer_states = [batched_state.layer(i) for i in range(L)]
    g_column = g.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    g_values = g.tolist()

    def diffusers_loop():
        out = []
        for i, state in enumerate(layer_states):
            state.restore()
            guided = e_u[i:i + 1] + g_values[i] * (e_c[i:i + 1] - e_u[i:i + 1])
            out.append(state.scheduler.step(guided, state.timestep, latents[i:i + 1]).prev_sample)
        return out

    def diffusers_batched():
        batched_state.restore()
        guided = e_u + g_column * (e_c - e_u)
        return batched_state.scheduler.step(guided, batched_state.timestep, latents).prev_sample

    providers["diffusers-loop"] = diffusers_loop
    providers["diffusers-batched"] = diffusers_batched
    return providers


def count_launches(fn, gpu: bool) -> int:
    """Device kernels of one call (GPU: the profiler's count); on the CPU an estimate: aten ops
    that produce more than a scalar (each is at least one kernel on a GPU) plus Triton launches."""
    if gpu:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    not_kernels = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                   torch.ops.aten.empty_strided.default, torch.ops.aten._local_scalar_dense.default}

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not func.is_view and func not in not_kernels and any(t.numel() > 1 for t in tensors):
                CountOps.count += 1
            return out

    with record_launches() as launches, CountOps():
        fn()
    return CountOps.count + len(launches)


def copy_bandwidth_gbs(device, gpu, repeats) -> float:
    """Device-to-device copy bandwidth: bytes read plus bytes written per second."""
    numel = (1 << 28) if gpu else (1 << 24)  # 1 GiB on a GPU, 64 MiB on the CPU, of float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    q = time_ms(lambda: dst.copy_(src), repeats=repeats)
    return 2 * src.numel() * src.element_size() / (q[1] * 1e-3) / 1e9


def step_grid(args, gpu):
    if args.quick:
        return [(L, (4, 16, 16), dtype) for L in (1, 2) for dtype in ("fp16", "fp32")]
    shapes = [(4, 64, 64), (4, 128, 128)]
    grid = [(L, shape, dtype) for shape in shapes for L in (1, 2, 4, 8) for dtype in ("fp16", "fp32")]
    if gpu:  # latents of 8 MB and more: images x layers, where the bandwidth target applies
        grid += [(L, (4, 128, 128), dtype) for L in (32, 64) for dtype in ("fp16", "fp32")]
    return grid


def composite_grid(args, gpu):
    if args.quick:
        return [(2, (3, 32, 32), "fp16")]
    sizes = [(3, 512, 512), (3, 1024, 1024)] if gpu else [(3, 128, 128)]
    return [(L, size, dtype) for size in sizes for L in (1, 2, 4, 8) for dtype in ("fp16", "fp32")]


def run_steps(args, gpu, device, results, copy_gbs, tqdm):
    for L, shape, dtype_name in tqdm(step_grid(args, gpu), desc="fused step", unit="config"):
        dtype = DTYPES[dtype_name]
        latents = torch.randn(L, *shape, device=device).to(dtype)
        e_u, e_c = (torch.randn(L, *shape, device=device).to(dtype) for _ in range(2))
        g = (1.0 + 9.0 * torch.rand(L)).to(device)
        useful_bytes = ACCESSES[args.scheduler] * latents.numel() * latents.element_size()
        x = f"{dtype_name} {'x'.join(map(str, shape))} L{L}"
        params = dict(scheduler=args.scheduler, layers=L, latent_shape=list(shape), dtype=dtype_name,
                      bytes_per_step=useful_bytes, copy_gbs=copy_gbs)
        times = {}
        for name, fn in step_providers(args.scheduler, latents, e_u, e_c, g, gpu).items():
            if args.providers and name not in args.providers:
                continue
            q = time_ms(fn, repeats=1 if args.quick else args.repeats)
            times[name] = q
            gbs = useful_bytes / (q[1] * 1e-3) / 1e9
            results.add(kernel="fused_step", provider=name, mode="step", metric="ms", x=x, quantiles=q, **params)
            results.add(kernel="fused_step", provider=name, mode="step", metric="GB/s", x=x,
                        quantiles=tuple(useful_bytes / (t * 1e-3) / 1e9 for t in reversed(q)), **params)
            results.add(kernel="fused_step", provider=name, mode="step", metric="copy_fraction", x=x,
                        value=gbs / copy_gbs, **params)
            results.add(kernel="fused_step", provider=name, mode="step", metric="launches", x=x,
                        value=count_launches(fn, gpu), **params)
        for fused in [n for n in times if n.startswith("fused-")]:
            for peer in ("diffusers-loop", "diffusers-batched"):
                if peer in times:
                    results.add(kernel="fused_step", provider=fused, mode="step", metric=f"speedup_vs_{peer}",
                                x=x, value=times[peer][1] / times[fused][1], **params)
        tqdm.write(f"{x}: " + "  ".join(f"{n}={t[1]:.3f}ms" for n, t in times.items()))


def run_composite(args, gpu, device, results, copy_gbs, tqdm):
    backends = ["triton", "torch"] + (["cuda"] if gpu and cuda_lib.unavailable_reason(torch.device(device)) is None
                                      else [])
    for L, (C, H, W), dtype_name in tqdm(composite_grid(args, gpu), desc="composite", unit="config"):
        dtype = DTYPES[dtype_name]
        layers = torch.rand(L, 1, C, H, W, device=device).to(dtype)
        alphas = torch.rand(L, 1, 1, H, W, device=device).to(dtype)
        original = torch.rand(1, C, H, W, device=device).to(dtype)
        region = (torch.rand(1, 1, H, W, device=device) + 0.01).clamp(max=1).to(dtype)  # all inside: every byte read
        useful_bytes = sum(t.numel() * t.element_size() for t in (layers, alphas, original, region, original))
        x = f"{dtype_name} {C}x{H}x{W} L{L}"
        params = dict(layers=L, image_shape=[C, H, W], dtype=dtype_name, bytes=useful_bytes, copy_gbs=copy_gbs)
        for backend in backends:
            name = f"composite-{backend}"
            if args.providers and name not in args.providers:
                continue
            q = time_ms(lambda: composite_layers(layers, alphas, original, region, backend=backend),
                        repeats=1 if args.quick else args.repeats)
            gbs = useful_bytes / (q[1] * 1e-3) / 1e9
            results.add(kernel="composite_layers", provider=name, mode="fwd", metric="ms", x=x, quantiles=q, **params)
            results.add(kernel="composite_layers", provider=name, mode="fwd", metric="GB/s", x=x,
                        quantiles=tuple(useful_bytes / (t * 1e-3) / 1e9 for t in reversed(q)), **params)
            results.add(kernel="composite_layers", provider=name, mode="fwd", metric="copy_fraction", x=x,
                        value=gbs / copy_gbs, **params)
            tqdm.write(f"{x}: {name} {q[1]:.3f} ms, {gbs:.1f} GB/s ({gbs / copy_gbs:.0%} of copy)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, claims nothing")
    parser.add_argument("--scheduler", choices=tuple(ACCESSES), default="dpm++2m")
    parser.add_argument("--providers", nargs="*", help="only these providers")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repeats per timing")
    parser.add_argument("--skip-composite", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    diffusers_logging.set_verbosity_error()
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    results = Results("step")
    copy_gbs = copy_bandwidth_gbs(device, gpu, 1 if args.quick else args.repeats)
    results.add(kernel="copy", provider="torch", mode="copy", metric="GB/s", x="device copy", value=copy_gbs)
    tqdm.write(f"device copy bandwidth: {copy_gbs:.1f} GB/s")
    run_steps(args, gpu, device, results, copy_gbs, tqdm)
    if not args.skip_composite:
        run_composite(args, gpu, device, results, copy_gbs, tqdm)

    out_dir = args.out or (Path(__file__).resolve().parent / "results" / ("quick" if args.quick else device_slug()))
    path = results.write(out_dir)
    step_rows = [r for r in results.rows if r["kernel"] == "fused_step"]
    plots = [plot_rows(step_rows, "ms", out_dir / "step_ms.png", title=f"fused step ({args.scheduler})", log=True),
             plot_rows(results.rows, "GB/s", out_dir / "step_gbs.png", title="effective GB/s")]
    print(f"wrote {path}" + "".join(f" and {p}" for p in plots if p))
    return results


if __name__ == "__main__":
    main()
