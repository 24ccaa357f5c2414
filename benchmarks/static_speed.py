"""Static speed report: what each kernel's steady-state loop costs, read from its SASS, no GPU.

At the headline shape (bf16, B=1, H=32, N=4096, D=64) each entry records its kernel's
launch with ``record_launches()`` (CPU tensors, nothing computed), compiles it for
sm_90 (or ``--arch 80``) exactly as the JIT would, and reads from the cubin:
registers, spill bytes, shared memory, resident CTAs per SM, and for every main loop
(an innermost loop that runs tensor-core MMAs) the instructions one warp issues per
iteration: wgmma (HGMMA), mma.sync (HMMA), MUFU.EX2 and in all. Normalised by the
(query, key) pairs an iteration covers (BLOCK_M * BLOCK_N of the kernel's config),

    warp-instructions per 1,000 pairs = instructions per iteration * num_warps / pairs * 1000

is a device-free proxy for issue cost: the ratio column divides it by the entry's
baseline (the plain flash kernel doing the same job). It counts each instruction in
the loop body once, so code behind a branch inside the loop counts as if always run.

    python -m benchmarks.static_speed [--arch 90] [--json OUT]

New kernels join as ``Entry`` rows in ENTRIES. Interpreted kernels cannot be compiled:
this module unsets TRITON_INTERPRET before triton is first imported, so run it as its
own process (tests/test_static_speed.py does), not imported into an interpreter session.
"""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    # Before anything imports triton: @triton.jit picks interpreted or compiled kernels at
    # decoration time. A process that already imported triton keeps its mode (see above).
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from mild_kernels import _aot  # noqa: E402
from mild_kernels._runtime import RecordedLaunch, record_launches  # noqa: E402

# The headline shape of the attention benchmarks: SD-scale self-attention at 64x64 latents.
HEADLINE = dict(batch=1, heads=32, tokens=4096, head_dim=64, dtype=torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One kernel in the report.

    record: returns the recorded launches of this kernel at the headline shape;
    pairs_per_iteration: the (query, key) pairs one main-loop iteration covers, from a launch;
    baseline: the name of the entry this one's cost is divided by, or None;
    useful_macs: the multiply-adds a (query, key) pair needs in this kernel (e.g. 2 D for a
        forward: q.k and p.v), against which the tensor work the loop issues is measured.
    """

    name: str
    record: Callable[[], list[RecordedLaunch]]
    pairs_per_iteration: Callable[[RecordedLaunch], int]
    baseline: str | None = None
    useful_macs: int | None = None


def tile_pairs(launch: RecordedLaunch) -> int:
    """BLOCK_M * BLOCK_N: one iteration of a flash loop covers one (query tile, key tile) pair."""
    return launch.kwargs["BLOCK_M"] * launch.kwargs["BLOCK_N"]


def _headline_tensors(count: int, head_dim: int = HEADLINE["head_dim"], tokens: int = HEADLINE["tokens"],
                      heads: int = HEADLINE["heads"]) -> list[torch.Tensor]:
    """(B, H, N, D) views of (B, N, H * D) tensors, as a UNet's attention makes them: the token
    stride is H * D, which the JIT's divisibility hint covers for SD's 40 too."""
    # Launches are recorded, not run: uninitialised CPU memory is all a launch needs.
    B = HEADLINE["batch"]
    return [torch.empty(B, tokens, heads, head_dim, dtype=HEADLINE["dtype"]).transpose(1, 2) for _ in range(count)]


def _only(launches: list[RecordedLaunch], kernel_name: str | tuple[str, ...]) -> list[RecordedLaunch]:
    """The launches of the kernel (or kernels: an op's mixed and pure kernels) named, in launch order."""
    names = (kernel_name,) if isinstance(kernel_name, str) else kernel_name
    picked = [launch for launch in launches if launch.kernel.__name__ in names]
    assert picked, f"no {kernel_name} launch was recorded"
    return picked


def record_plain_forward(head_dim: int = HEADLINE["head_dim"], tiles=None) -> Callable[[], list[RecordedLaunch]]:
    """The plain forward at ``head_dim``, with its tiles for that head dim or ``tiles`` (a plain_flash.TileConfig)."""
    def record():
        from benchmarks.plain_flash import plain_flash_forward

        q, k, v = _headline_tensors(3, head_dim)
        with record_launches() as launches:
            plain_flash_forward(q, k, v, config=tiles)
        return _only(launches, "_plain_fwd_kernel")

    return record


def record_plain_backward(kernel_name: str, head_dim: int = HEADLINE["head_dim"],
                          config=None) -> Callable[[], list[RecordedLaunch]]:
    """The plain backward's ``kernel_name`` at ``head_dim``, with its tiles for that head dim or
    ``config`` (a plain_flash.BackwardConfig)."""
    def record():
        from benchmarks.plain_flash import plain_flash_backward

        q, k, v, out, do = _headline_tensors(5, head_dim)
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        with record_launches() as launches:
            plain_flash_backward(do, q, k, v, out, lse, config=config)
        return _only(launches, kernel_name)

    return record


# SMA at the headline: R = 4 regions, tokens region-sorted, nothing blocked, a per-head bias.
# "aligned": every region owns whole tiles (1024 tokens each), so every tile pair is pure;
# "boundary": regions of 1000, 1100, 900 and 1096 tokens, so key tiles at the three
# boundaries (and their pairs) take the mixed path.
# "flux" / "sd3": a diffusion transformer's joint attention at 1024 x 1024: the boundary image
# regions and one more region of text (512 tokens in FLUX.1, 333 in SD3: 4429 in all, a token
# count no tile divides), region-sorted, as SMAFluxAttnProcessor / SMAJointAttnProcessor run it.
HEADLINE_REGIONS = 4
REGION_SIZES = {"aligned": (1024, 1024, 1024, 1024), "boundary": (1000, 1100, 900, 1096),
                "flux": (1000, 1100, 900, 1096, 512), "sd3": (1000, 1100, 900, 1096, 333)}
TRANSFORMER_ATTENTION = {"flux": dict(heads=24, head_dim=128), "sd3": dict(heads=24, head_dim=64)}


def sma_headline_call(soft: bool, sizes: str = "aligned", backward: bool = False, mass: bool = False,
                      head_dim: int = HEADLINE["head_dim"], heads: int = HEADLINE["heads"]):
    """Run sma_attention at the headline (or a transformer's joint shape) inside
    record_launches(); the recorded launches."""
    from mild_kernels import prepare_regions, sma_attention

    counts = torch.tensor(REGION_SIZES[sizes])
    R = len(counts)
    labels = torch.arange(R).repeat_interleave(counts)
    regions = torch.nn.functional.one_hot(labels, R).float() if soft else labels
    layout = prepare_regions(regions)
    q, k, v = (t.requires_grad_(backward) for t in _headline_tensors(3, head_dim, int(counts.sum()), heads))
    bias = torch.randn(heads, R, R).requires_grad_(backward)
    with record_launches() as forward:
        result = sma_attention(q, k, v, bias=bias, layout=layout, return_lse=True, return_region_mass=mass,
                               backend="triton")
    if not backward:
        return forward
    with record_launches() as launches:
        loss = result.out.sum() + (result.region_mass.sum() if mass else 0)
        loss.backward()
    return launches


# An op's kernels whose loops the report reads together: the mixed launch's, then the pure launch's.
SMA_FORWARD = ("_sma_fwd_mixed_kernel", "_sma_fwd_pure_kernel")
SMA_DQ = ("_sma_bwd_dq_mixed_kernel", "_sma_bwd_dq_pure_kernel")


def record_sma(kernel_name: str | tuple[str, ...], soft: bool, sizes: str = "aligned", backward: bool = False,
               head_dim: int = HEADLINE["head_dim"], heads: int = HEADLINE["heads"]):
    def record():
        return _only(sma_headline_call(soft, sizes, backward, head_dim=head_dim, heads=heads), kernel_name)

    return record


def _sma_entries():
    """The SMA kernels at the headline (hard and soft regions, aligned and with boundaries), then
    SD 1.5's head dims and 128, each against the plain kernel and its useful tensor work."""
    d = HEADLINE["head_dim"]
    yield Entry("sma_fwd_hard", record_sma(SMA_FORWARD, False), tile_pairs, "plain_fwd", 2 * d)
    yield Entry("sma_fwd_soft", record_sma(SMA_FORWARD, True), tile_pairs, "plain_fwd", 2 * d)
    yield Entry("sma_fwd_bnd", record_sma(SMA_FORWARD, True, "boundary"), tile_pairs, "plain_fwd", 2 * d)
    yield Entry("sma_dkdv_hard", record_sma("_sma_bwd_dkdv_kernel", False, backward=True), tile_pairs,
                "plain_bwd_dkdv", 4 * d)
    yield Entry("sma_dq_hard", record_sma(SMA_DQ, False, backward=True), tile_pairs, "plain_bwd_dq",
                3 * d)
    yield Entry("sma_dkdv_bnd", record_sma("_sma_bwd_dkdv_kernel", True, "boundary", backward=True), tile_pairs,
                "plain_bwd_dkdv", 4 * d)
    yield Entry("sma_dq_bnd", record_sma(SMA_DQ, True, "boundary", backward=True), tile_pairs,
                "plain_bwd_dq", 3 * d)
    for head_dim in SD_HEAD_DIMS:  # each against the plain kernel of the same head dim
        yield Entry(f"sma_fwd_d{head_dim}", record_sma(SMA_FORWARD, True, head_dim=head_dim), tile_pairs,
                    f"plain_fwd_d{head_dim}", 2 * head_dim)
        yield Entry(f"sma_dkdv_d{head_dim}", record_sma("_sma_bwd_dkdv_kernel", True, backward=True, head_dim=head_dim),
                    tile_pairs, f"plain_bwd_dkdv_d{head_dim}", 4 * head_dim)
        yield Entry(f"sma_dq_d{head_dim}", record_sma(SMA_DQ, True, backward=True, head_dim=head_dim),
                    tile_pairs, f"plain_bwd_dq_d{head_dim}", 3 * head_dim)
    for model, shape in TRANSFORMER_ATTENTION.items():
        # Soft image regions and a text region, against the plain kernel of the model's head dim.
        head_dim, suffix = shape["head_dim"], "" if shape["head_dim"] == d else f"_d{shape['head_dim']}"
        for kernel, role, macs, backward in ((SMA_FORWARD, "fwd", 2, False),
                                             ("_sma_bwd_dkdv_kernel", "dkdv", 4, True),
                                             (SMA_DQ, "dq", 3, True)):
            baseline = f"plain_fwd{suffix}" if role == "fwd" else f"plain_bwd_{role}{suffix}"
            yield Entry(f"sma_{role}_{model}", record_sma(kernel, True, model, backward, **shape), tile_pairs,
                        baseline, macs * head_dim)


SD_HEAD_DIMS = (40, 80, 128, 160)  # beside the headline's 64: every head dim SD 1.5/2/XL and FLUX use
def _plain_entries():
    from benchmarks.plain_flash import TILES

    d = HEADLINE["head_dim"]
    yield Entry("plain_fwd", record_plain_forward(), tile_pairs, None, 2 * d)
    yield Entry("plain_bwd_dkdv", record_plain_backward("_plain_bwd_dkdv_kernel"), tile_pairs, None, 4 * d)
    yield Entry("plain_bwd_dq", record_plain_backward("_plain_bwd_dq_kernel"), tile_pairs, None, 3 * d)
    for head_dim in TILES:  # in plain_flash's tiles for each head dim (the strongest that do not spill)
        yield Entry(f"plain_fwd_d{head_dim}", record_plain_forward(head_dim), tile_pairs, None, 2 * head_dim)
        yield Entry(f"plain_bwd_dkdv_d{head_dim}", record_plain_backward("_plain_bwd_dkdv_kernel", head_dim),
                    tile_pairs, None, 4 * head_dim)
        yield Entry(f"plain_bwd_dq_d{head_dim}", record_plain_backward("_plain_bwd_dq_kernel", head_dim), tile_pairs,
                    None, 3 * head_dim)


ENTRIES = [*_plain_entries(), *_sma_entries()]


# ---------------------------------------------------------------- compiling
_JOBS: list = []  # (launch, arch), filled before the pool forks: kernels do not pickle


def _compile_job(index: int) -> dict:
    """Resources and loops of one launch: plain data, so it crosses the process boundary."""
    launch, arch = _JOBS[index]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice
        compiled = _aot.compile_launch(launch, arch)
    usage = _aot.resource_usage(compiled)
    main = [{**dataclasses.asdict(loop), "tensor_macs": loop.tensor_macs(launch.num_warps)}
            for loop in _aot.main_loops(_aot.sass(compiled))]
    return {**usage, "loops": main}


def _compile_all(jobs: list, workers: int) -> list[dict]:
    _JOBS[:] = jobs
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_job(i) for i in range(len(jobs))]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_compile_job, range(len(jobs))))


def report(entries: list[Entry] = ENTRIES, arch: int = 90, workers: int | None = None) -> list[dict]:
    """One row per (entry, launch, main loop); a launch without a main loop gets one row with loop=None.

    Row keys: name, kernel, arch, num_warps, num_stages, block_m, block_n, pairs_per_iteration,
    reg, local, stack, spill, shared, ctas_per_sm, loop (index), loop_start, loop_end, wgmma,
    mma_sync, mufu_ex2, instructions, families, warp_instructions_per_1k_pairs, baseline, ratio.
    """
    jobs, owners = [], []
    for entry in entries:
        launches = entry.record()
        for launch in launches:
            jobs.append((launch, arch))
            owners.append((entry, launch, len(launches)))
    results = _compile_all(jobs, workers or min(2, os.cpu_count() or 1))

    rows = []
    for (entry, launch, count), result in zip(owners, results):
        spill = result["local"] + result["stack"]
        common = dict(
            name=entry.name if count == 1 else f"{entry.name}/{launch.kernel.__name__}",
            entry=entry.name, kernel=launch.kernel.__name__, arch=f"sm_{arch}", num_warps=launch.num_warps,
            num_stages=launch.num_stages, block_m=launch.kwargs.get("BLOCK_M"), block_n=launch.kwargs.get("BLOCK_N"),
            pairs_per_iteration=entry.pairs_per_iteration(launch), reg=result["reg"], local=result["local"],
            stack=result["stack"], spill=spill, shared=result["shared"],
            ctas_per_sm=_aot.ctas_per_sm(result["reg"], result["shared"], launch.num_warps, arch),
            baseline=entry.baseline)
        if not result["loops"]:
            rows.append({**common, "loop": None})
        for index, loop in enumerate(result["loops"]):
            pairs = common["pairs_per_iteration"]
            per_1k = loop["instructions"] * launch.num_warps / pairs * 1000
            macs = loop["tensor_macs"] / pairs
            rows.append({**common, "loop": index, "loop_start": loop["start"], "loop_end": loop["end"],
                         "wgmma": loop["families"]["wgmma"], "mma_sync": loop["families"]["mma_sync"],
                         "mufu_ex2": loop["families"]["mufu_ex2"], "instructions": loop["instructions"],
                         "families": loop["families"], "warp_instructions_per_1k_pairs": per_1k,
                         "tensor_macs_per_pair": macs, "useful_macs_per_pair": entry.useful_macs,
                         "tensor_efficiency": entry.useful_macs / macs if entry.useful_macs and macs else None})

    # The baseline's figure is its cheapest main loop per pair: its steady state, not a tail.
    best = {}
    for row in rows:
        if row["loop"] is not None:
            best[row["entry"]] = min(best.get(row["entry"], float("inf")), row["warp_instructions_per_1k_pairs"])
    useful = {entry.name: entry.useful_macs for entry in entries}
    for row in rows:
        base = best.get(row["baseline"]) if row["baseline"] else None
        row["ratio"] = row["warp_instructions_per_1k_pairs"] / base if base and row["loop"] is not None else None
        # Per useful multiply-add: a head dim of 80 may cost 80/64 of 64's per pair, not more.
        base_useful, own_useful = useful.get(row["baseline"]), row.get("useful_macs_per_pair")
        row["ratio_per_flop"] = (row["ratio"] * base_useful / own_useful
                                 if row["ratio"] is not None and base_useful and own_useful else None)
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (f"{'kernel':<24} {'arch':<5} {'warps':>5} {'tile':>7} {'reg':>4} {'spill':>5} {'smem':>7} "
              f"{'CTA/SM':>6} {'loop':>4} {'wgmma':>5} {'mma':>4} {'ex2':>4} {'instr':>5} {'wi/1k':>6} {'ratio':>5} "
              f"{'r/flop':>6} {'mac/p':>6} {'eff':>5}")
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (f"{row['name']:<24} {row['arch']:<5} {row['num_warps']:>5} "
                f"{str(row['block_m']) + 'x' + str(row['block_n']):>7} {row['reg']:>4} {row['spill']:>5} "
                f"{row['shared']:>7} {row['ctas_per_sm']:>6} ")
        if row["loop"] is None:
            line += f"{'-':>4} (no main loop)"
        else:
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
            efficiency = f"{row['tensor_efficiency']:.2f}" if row["tensor_efficiency"] else "-"
            per_flop = f"{row['ratio_per_flop']:.2f}" if row["ratio_per_flop"] is not None else "-"
            line += (f"{row['loop']:>4} {row['wgmma']:>5} {row['mma_sync']:>4} {row['mufu_ex2']:>4} "
                     f"{row['instructions']:>5} {row['warp_instructions_per_1k_pairs']:>6.1f} {ratio:>5} "
                     f"{per_flop:>6} {row['tensor_macs_per_pair']:>6.0f} {efficiency:>5}")
        lines.append(line)
    return "\n".join(lines)


def format_families(rows: list[dict]) -> str:
    """Each main loop's instructions per iteration by family (zeros left out)."""
    lines = []
    for row in rows:
        if row["loop"] is not None:
            counts = ", ".join(f"{family} {n}" for family, n in row["families"].items() if n)
            lines.append(f"{row['name']} loop {row['loop']} [{row['loop_start']:#x}, {row['loop_end']:#x}]: {counts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(_aot.SM_LIMITS))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: up to 2)")
    args = parser.parse_args(argv)

    from mild_kernels._runtime import target_arch

    with target_arch(args.arch):  # the launches take that architecture's config tables
        rows = report(ENTRIES, args.arch, args.workers)
    shape = ", ".join(f"{k}={v}" for k, v in HEADLINE.items()).replace("torch.", "")
    print(f"static speed, sm_{args.arch}, {shape}")
    print("per main loop: instructions one warp issues per iteration; wi/1k: warp-instructions per 1,000 "
          "(q, k) pairs; ratio: wi/1k over the baseline's\n")
    print(format_rows(rows))
    print()
    print(format_families(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
