"""Spatially-modulated attention against its peers.

Providers, each computing the same function (bias per head and region pair,
blocked region pairs):

- ``mild-triton``: sma_attention's Triton kernel (GPU);
- ``mild-torch``: sma_attention's chunked torch backend (CPU);
- ``sdpa-mask``: F.scaled_dot_product_attention with a prebuilt dense float mask;
- ``flex``: compiled FlexAttention, the bias as a score_mod and the allow table as a BlockMask;
- ``xformers``: memory_efficient_attention with a tensor bias, where installed (GPU);
- ``naive``: the materialised softmax(QK^T * scale + mask) V;
- ``plain-flash``: the project's plain Triton flash attention with no bias and no regions
  (benchmarks/plain_flash.py), the ceiling of this design in Triton (GPU, D a multiple of 8).

Reports ms, TFLOP/s counted dense (4 B H Nq Nk D) and the speedup of sma_attention
over each peer; writes benchmarks/results/<device>/attention.json and a plot.

    python -m benchmarks.bench_attention            # CPU: the CPU target shapes; GPU: SD shapes
    python -m benchmarks.bench_attention --quick    # tiny shapes, a smoke test of the harness
    python -m benchmarks.bench_attention --shapes flux   # FLUX.1's joint attention (sd3: SD3's)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from benchmarks.common import DTYPES, Results, device_slug, on_gpu, plot_rows, time_ms  # noqa: E402
from mild_kernels import prepare_regions, region_sort, sma_attention  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    tokens: int  # the whole sequence: a joint one counts its text tokens too
    head_dim: int
    text: int = 0  # a diffusion transformer's joint sequence: this many text tokens, first, of no region


GPU_SHAPES = [
    Shape("sd15-512/64x64", 2, 8, 4096, 40),
    Shape("sd15-512/32x32", 2, 8, 1024, 80),
    Shape("sd15-512/16x16", 2, 8, 256, 160),
    Shape("sdxl-1024/64x64", 2, 10, 4096, 64),
    Shape("sdxl-1024/32x32", 2, 20, 1024, 64),
    Shape("target/bh32", 4, 8, 4096, 64),
]
CPU_SHAPES = [
    Shape("cpu-target", 1, 8, 4096, 64),
    Shape("sd15-512/32x32", 1, 8, 1024, 80),
    Shape("sd15-512/16x16", 1, 8, 256, 160),
]
# Diffusion transformers at 1024 x 1024, one joint text-image attention per block:
# FLUX.1 (Fill): 4096 image + 512 text tokens, 24 heads of 128; SD3: 4096 + 333 (77 CLIP + 256 T5), 24 heads of 64.
TRANSFORMER_SHAPES = {
    "flux": [Shape("flux-1024/joint", 1, 24, 4096 + 512, 128, text=512)],
    "sd3": [Shape("sd3-1024/joint", 1, 24, 4096 + 333, 64, text=333)],
}
SHAPE_SETS = ("sd", *TRANSFORMER_SHAPES)
QUICK_SHAPES = [Shape("quick", 1, 2, 256, 40)]
QUICK_JOINT = Shape("quick-joint", 1, 2, 192 + 37, 64, text=37)


def on_cpu(shape: Shape) -> Shape:
    """A transformer shape the CPU can time: 2 heads instead of 24 (the sequence kept)."""
    return dataclasses.replace(shape, name=shape.name + "/h2", heads=2)


@dataclasses.dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor  # (H, R, R)
    allow: torch.Tensor  # (R, R)

    def dense_mask(self) -> torch.Tensor:
        """(1, H, N, N) float mask: the bias, -inf at blocked pairs."""
        lab = self.labels
        table = self.bias.detach().masked_fill(~self.allow, float("-inf"))
        return table[:, lab][:, :, lab][None].to(self.q.dtype)


def block_region_pairs(regions: int, fraction: float, generator) -> torch.Tensor:
    """An allow table with about ``fraction`` of the R*R pairs blocked; the diagonal stays allowed."""
    allow = torch.ones(regions, regions, dtype=torch.bool)
    off = [(i, j) for i in range(regions) for j in range(regions) if i != j]
    count = min(len(off), round(fraction * regions * regions))
    for idx in torch.randperm(len(off), generator=generator)[:count].tolist():
        allow[off[idx]] = False
    return allow


def make_problem(shape: Shape, regions: int, blocked: float, order: str, dtype, device) -> Problem:
    """Random q, k, v and ``regions`` regions; a joint shape's text tokens come first and form
    region ``regions`` (zero bias, every pair allowed: text of no region, docs/semantics.md)."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = shape.batch, shape.heads, shape.tokens, shape.head_dim
    # The background takes about half the image tokens; persons share the rest.
    weights = torch.tensor([float(regions - 1)] + [1.0] * (regions - 1))
    labels = torch.multinomial(weights / weights.sum(), N - shape.text, replacement=True, generator=gen)
    bias = 0.5 * torch.randn(H, regions, regions, generator=gen)
    allow = block_region_pairs(regions, blocked, gen)
    if shape.text:
        labels = torch.cat([torch.full((shape.text,), regions), labels])
        bias = F.pad(bias, (0, 1, 0, 1))
        allow = F.pad(allow, (0, 1, 0, 1), value=True)
    if order == "sorted":
        labels = labels[region_sort(labels).perm]
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype).to(device) for _ in range(3))
    return Problem(q, k, v, labels.to(device), bias.to(device), allow.to(device))


def dense_flops(p: Problem) -> float:
    B, H, N, D = p.q.shape
    return 4.0 * B * H * N * p.k.shape[2] * D


def mild_provider(p: Problem, backend: str):
    # The regions are prepared once, outside the timed call, as FlexAttention's BlockMask and
    # SDPA's dense mask are built once: a UNet prepares them once per resolution.
    layout = prepare_regions(p.labels, allow=p.allow, num_regions=p.bias.shape[-1])
    # In fwd+bwd mode the bias requires grad too: sma_attention returns its gradient.
    return lambda: sma_attention(p.q, p.k, p.v, bias=p.bias, layout=layout, backend=backend)


def sdpa_provider(p: Problem):
    mask = p.dense_mask()
    return lambda: F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=mask)


def naive_provider(p: Problem):
    mask = p.dense_mask()
    scale = p.q.shape[-1] ** -0.5

    def run():
        scores = (p.q @ p.k.transpose(-1, -2)) * scale + mask
        return torch.softmax(scores.float(), -1).to(p.q.dtype) @ p.v

    return run


def with_backward(forward, p: Problem):
    """forward() then backward of its output against a fixed random cotangent."""
    grad = torch.randn_like(p.q)
    leaves = [p.q, p.k, p.v, p.bias]

    def run():
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return run


_compiled_flex = None


def flex_provider(p: Problem):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    labels, bias, allow = p.labels, p.bias.detach().to(p.q.dtype), p.allow
    N = p.q.shape[2]

    def score_mod(score, b, h, q_idx, k_idx):
        return score + bias[h, labels[q_idx], labels[k_idx]]

    def mask_mod(b, h, q_idx, k_idx):
        return allow[labels[q_idx], labels[k_idx]]

    block_mask = create_block_mask(mask_mod, None, None, N, N, device=p.q.device)
    return lambda: _compiled_flex(p.q, p.k, p.v, score_mod=score_mod, block_mask=block_mask)


def xformers_provider(p: Problem):
    import xformers.ops as xops

    B, H, N, _ = p.q.shape
    # xformers wants the bias's last dim padded to a multiple of 8, then sliced.
    padded = torch.empty(B, H, N, math.ceil(N / 8) * 8, dtype=p.q.dtype, device=p.q.device)
    bias = padded[..., :N]
    bias.copy_(p.dense_mask().expand(B, H, N, N))
    q, k, v = (t.transpose(1, 2) for t in (p.q, p.k, p.v))
    return lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def plain_flash_provider(p: Problem):
    """The ceiling: the project's plain Triton flash attention (no bias, no regions, nothing skipped)."""
    from benchmarks.plain_flash import plain_flash_attention

    return lambda: plain_flash_attention(p.q, p.k, p.v)


def providers(p: Problem, gpu: bool, backward: bool = False) -> dict:
    chosen = {"mild-triton": lambda: mild_provider(p, "triton")} if gpu else {"mild-torch": lambda: mild_provider(p, "torch")}
    chosen.update({"sdpa-mask": lambda: sdpa_provider(p), "flex": lambda: flex_provider(p),
                   "naive": lambda: naive_provider(p)})
    if gpu and p.q.shape[-1] % 8 == 0 and 16 <= p.q.shape[-1] <= 256:
        chosen["plain-flash"] = lambda: plain_flash_provider(p)
    if gpu:
        try:
            import xformers.ops  # noqa: F401

            chosen["xformers"] = lambda: xformers_provider(p)
        except ImportError:
            pass
    if backward:
        for t in (p.q, p.k, p.v, p.bias):
            t.requires_grad_()
        chosen = {name: (lambda build=build: with_backward(build(), p)) for name, build in chosen.items()}
    return chosen


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_extra_mb(provider_name, shape, regions, blocked, order, dtype_name, queue):
    p = make_problem(shape, regions, blocked, order, DTYPES[dtype_name], "cpu")
    fn = providers(p, gpu=False)[provider_name]()
    fn()  # the first call also pages in code and builds one-time state: not the call's memory
    # Reset the peak resident size to the current one (Linux: clear_refs 5), so that the
    # setup's own temporaries do not hide the call's peak.
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident_kib("VmRSS")
    fn()
    queue.put((_resident_kib("VmHWM") - before) / 1024)


def peak_extra_memory_mb(provider_name, shape, regions, blocked, order, dtype_name) -> float:
    """CPU peak resident memory added by one call (MiB), measured in a fresh process.

    Setup (inputs, a prebuilt mask) and a first call happen before the baseline, so only a
    steady-state call counts.
    glibc's malloc is told to map every block over 64 KiB afresh (and unmap it when freed),
    so that the call's allocations show in the resident size rather than reusing pages
    the setup freed.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's malloc at start
    try:
        proc = context.Process(target=_peak_extra_mb,
                               args=(provider_name, shape, regions, blocked, order, dtype_name, queue))
        proc.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    value = queue.get()
    proc.join()
    return value


def configurations(args, gpu):
    """(shape, regions, blocked fraction, order) cases: ``args.quick`` tiny ones (a joint
    sequence among them), else ``args.shapes``'s set: "sd" (UNet resolutions), "flux", "sd3"."""
    if args.quick:
        return [(s, r, b, "sorted") for s in QUICK_SHAPES for r in (3,) for b in (0.0, 0.5)] + [
            (QUICK_JOINT, 3, 0.5, "sorted")]
    shape_set = getattr(args, "shapes", "sd")
    if shape_set in TRANSFORMER_SHAPES:
        shapes = [s if gpu else on_cpu(s) for s in TRANSFORMER_SHAPES[shape_set]]
        return [(s, 4, blocked, "sorted") for s in shapes for blocked in (0.0, 0.5, 0.8)] + [
            (shapes[0], 4, 0.5, "raster")]
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    configs = []
    for shape in shapes:
        for blocked in (0.0, 0.5, 0.8):
            configs.append((shape, 4, blocked, "sorted"))
    main = shapes[0]
    configs += [(main, r, 0.5, "sorted") for r in (2, 6)]
    configs += [(main, 4, 0.5, "raster")]
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, claims nothing")
    parser.add_argument("--shapes", choices=SHAPE_SETS, default="sd",
                        help="sd: UNet resolutions of SD 1.5/SDXL; flux / sd3: their joint attention at 1024 x 1024 "
                             "(2 heads on the CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--providers", nargs="*", help="only these providers")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repeats per timing")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    backward = args.mode == "fwd+bwd"
    results = Results(("attention" if not backward else "attention_fwd_bwd")
                      + ("" if args.quick or args.shapes == "sd" else f"_{args.shapes}"))
    # FlashAttention's count: the backward does 2.5x the forward's matmul work.
    flops_factor = 3.5 if backward else 1.0
    configs = configurations(args, gpu)
    mild_name = "mild-triton" if gpu else "mild-torch"
    for shape, regions, blocked, order in tqdm(configs, desc="attention", unit="config"):
        p = make_problem(shape, regions, blocked, order, DTYPES[dtype_name], device)
        x = f"{shape.name} R{regions} blk{int(blocked * 100)}% {order}"
        params = dict(shape=dataclasses.asdict(shape), regions=regions, blocked=blocked, order=order,
                      dtype=dtype_name, blocked_pairs=int((~p.allow).sum()))
        times = {}
        for name, build in providers(p, gpu, backward).items():
            if args.providers and name not in args.providers:
                continue
            try:
                fn = build()
                q = time_ms(fn, repeats=1 if args.quick else args.repeats)
            except Exception as error:  # a peer that cannot run this shape is reported, not fatal
                tqdm.write(f"{x}: {name} failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            times[name] = q
            results.add(kernel="sma_attention", provider=name, mode=args.mode, metric="ms", x=x, quantiles=q, **params)
            results.add(kernel="sma_attention", provider=name, mode=args.mode, metric="tflops", x=x,
                        quantiles=tuple(flops_factor * dense_flops(p) / (t * 1e-3) / 1e12 for t in reversed(q)),
                        **params)
        if mild_name in times:
            for peer, q in times.items():
                if peer != mild_name:
                    results.add(kernel="sma_attention", provider=mild_name, mode=args.mode,
                                metric=f"speedup_vs_{peer}", x=x, value=q[1] / times[mild_name][1], **params)
        line = "  ".join(f"{n}={t[1]:.2f}ms" for n, t in times.items())
        tqdm.write(f"{x}: {line}")

    if not gpu and not args.quick and not backward and args.shapes == "sd":
        shape = CPU_SHAPES[0]
        mask_mb = shape.batch * shape.heads * shape.tokens ** 2 * DTYPES[dtype_name].itemsize / 2**20
        for name in (mild_name, "sdpa-mask"):
            extra = peak_extra_memory_mb(name, shape, 4, 0.5, "sorted", dtype_name)
            results.add(kernel="sma_attention", provider=name, mode="fwd", metric="peak_extra_mb",
                        x=f"{shape.name} R4 blk50% sorted", value=extra, dense_mask_mb=mask_mb)
            tqdm.write(f"peak extra memory of {name}: {extra:.1f} MiB (the dense mask alone is {mask_mb:.0f} MiB)")

    out_dir = args.out or (Path(__file__).resolve().parent / "results" / ("quick" if args.quick else device_slug()))
    path = results.write(out_dir)
    plot = plot_rows(results.rows, "ms", out_dir / f"{results.benchmark}_ms.png",
                     title=f"sma_attention {args.mode}, {dtype_name}", log=True)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return results


if __name__ == "__main__":
    main()
