"""Ahead-of-time compile gate: every shipped Triton kernel config, for sm_80 and sm_90, no GPU.

Each case drives a public wrapper on tiny CPU tensors inside ``record_launches()``,
so the gate compiles exactly the kernels, argument types and constexprs the
wrapper would launch. Each recorded launch is compiled with ``triton.compile`` for
every target, and the cubin's resource usage is read with the cuobjdump bundled
with Triton. A kernel fails the gate if it uses local memory or stack (register
spills) beyond its config's KNOWN_SPILLS budget (zero for every head-dim class up to
128 but D=80 with R > 16 regions' dK/dV, and for all but a few above), or more shared memory
than the target has.

Run as ``python tests/compile_gate.py [--json OUT] [--quick]``; tests/test_compile_gate.py
runs it in a subprocess with TRITON_INTERPRET unset, because interpreted kernels
cannot be compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

TORCH_TO_TRITON = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}


# ---------------------------------------------------------------- cases
# Each head-dim class compiled at its widest member, and where the class splits head dims
# differently (two blocks, one masked: 40 = 32 + 16) at that member too.
GATE_HEAD_DIMS = {48: (48, 40), 64: (64,), 80: (80,), 96: (96, 88), 128: (128,), 160: (160, 144), 256: (256, 192)}
GATE_HEAD_DIMS_FP32 = {64: (64, 40), 128: (128, 80), 256: (256, 160)}
GATE_TOKENS = 1024  # SD's token counts are multiples of 16: the JIT's divisibility hints apply
# Per variant: (soft, region mass, R, head dims to compile). Regions of uneven sizes, so that
# key tiles at their boundaries take the mixed path, and a blocked pair: every kernel variant
# a launch can pick (mixed and pure launches, masks, shift table) is compiled.
SMA_VARIANT_CASES = {
    # soft: its mixed tiles' bias operands are the widest at R <= 4. "aligned" compiles the
    # other end of the pure launch's variants: regions on the tile grid, nothing blocked, so no
    # mixed tile (the kernels' HAS_MIXED branches compile out), and a forward without gradient.
    # ptxas may spill the lighter variant and not the heavier one: the backward with no mixed
    # tile spilled 8 B in sm_80's D=128 dK/dV before it was gated (2026-12-03).
    # hard: labels instead of memberships (their own mixed-tile code and dW kernel).
    "plain": [(True, False, 4, "both"), (True, False, 4, "aligned"), (False, False, 4, "widest")],
    # many: 4 < R <= 16 without the mass (configs.config_variant), compiled at R = 16.
    "many": [(True, False, 16, "widest"), (False, False, 16, "widest")],
    "mass": [(True, True, 16, "widest")],
    "wide": [(True, True, 64, "widest")],
}
# Kernels whose code no config sets: compiled once per distinct variant of these constexprs.
CONFIG_FREE = {"_sma_bwd_preprocess": ("MASS_GRAD", "LSE_GRAD"), "_sma_bwd_dbias_kernel": ("SOFT", "RP")}


def _region_labels(R: int, tokens: int) -> torch.Tensor:
    sizes = torch.full((R,), tokens // R)
    sizes[0] += tokens - int(sizes.sum())
    if R > 1:
        shift = min(37, int(sizes[0]) // 2)  # every boundary off the tile grid
        sizes[0] -= shift
        sizes[1] += shift
    return torch.arange(R).repeat_interleave(sizes)


def sma_launch(head_dim, soft, mass, R, dtype, backward=False, aligned=False):
    """A thunk that drives sma_attention into one forward or backward variant: a blocked pair and
    region boundaries off the tile grid, or (aligned) neither, and then a forward without gradient."""
    from mild_kernels import sma_attention
    from mild_kernels._runtime import record_launches

    def run():
        # (B, H, N, D) views of (B, N, H * D), as a UNet's attention makes them.
        inference = aligned and not backward
        q = torch.randn(1, GATE_TOKENS, 2, head_dim).to(dtype).transpose(1, 2).requires_grad_(not inference)
        if aligned:
            labels = torch.arange(R).repeat_interleave(GATE_TOKENS // R)
        else:
            labels = _region_labels(R, GATE_TOKENS)
        regions = torch.nn.functional.one_hot(labels, R).float() if soft else labels
        allow = torch.ones(R, R, dtype=torch.bool)
        if not aligned:
            allow[0, R - 1] = False
        bias = torch.randn(2, R, R).requires_grad_(not inference)
        args = (q, q, q, regions, regions, bias, allow)
        if not backward:
            sma_attention(*args, return_lse=True, return_region_mass=mass, backend="triton")
            return
        with record_launches():  # the forward's launches belong to the forward cases
            res = sma_attention(*args, return_lse=True, return_region_mass=mass, backend="triton")
        loss = res.out.sum() + res.lse.sum() + (res.region_mass.sum() if mass else 0)
        loss.backward()

    return run


def _config_cases(table, prefix, backward):
    for key in sorted(table):
        block_d, is_fp32, variant = key
        dtype = torch.float32 if is_fp32 else torch.float16  # bf16's codegen is fp16's
        widest, *others = (GATE_HEAD_DIMS_FP32 if is_fp32 else GATE_HEAD_DIMS)[block_d]
        for soft, mass, R, dims in SMA_VARIANT_CASES[variant]:
            aligned = dims == "aligned"
            for head_dim in ((widest, *others) if dims in ("both", "aligned") else (widest,)):
                flags = ("soft" if soft else "hard") + (",mass" if mass else "") + (",aligned" if aligned else "")
                name = f"{prefix}[d{block_d},{TORCH_TO_TRITON[dtype]},{variant},D{head_dim},R{R},{flags}]"
                yield name, sma_launch(head_dim, soft, mass, R, dtype, backward, aligned)
        if variant == "many":
            yield from _joint_cases(block_d, dtype, prefix, backward)


def sma_forward_cases(configs=None):
    """(name, thunk) for every shipped forward config and each kernel variant it serves."""
    from mild_kernels.sma.configs import FORWARD_CONFIGS

    yield from _config_cases(configs or FORWARD_CONFIGS, "sma_fwd", backward=False)


def sma_backward_cases(configs=None):
    """(name, thunk) for every shipped backward config and each kernel variant it serves."""
    from mild_kernels.sma.configs import BACKWARD_CONFIGS

    yield from _config_cases(configs or BACKWARD_CONFIGS, "sma_bwd", backward=True)


# Diffusion transformers' joint attention (SMAFluxAttnProcessor, SMAJointAttnProcessor): soft
# image regions plus a text region (R = 5: the "many" configs), region-sorted into contiguous
# (B, H, N, D) tensors, with FLUX.1's 512 text tokens and SD3's 333 (a token count the JIT gives
# no divisibility hint). Compiled with the "many" variant of their head-dim class.
JOINT_TEXT_TOKENS = {"flux": (128, 512), "sd3": (64, 333)}  # model: (head dim, text tokens)


def joint_launch(head_dim, text, dtype, backward):
    from mild_kernels import prepare_regions, sma_attention
    from mild_kernels._runtime import record_launches

    def run():
        R = 4
        labels = torch.cat([_region_labels(R, GATE_TOKENS), torch.full((text,), R)])
        layout = prepare_regions(torch.nn.functional.one_hot(labels, R + 1).float())
        q = torch.randn(1, 2, len(labels), head_dim).to(dtype).requires_grad_(backward)
        bias = torch.nn.functional.pad(torch.randn(2, R, R), (0, 1, 0, 1)).requires_grad_(backward)
        if not backward:
            sma_attention(q, q, q, bias=bias, layout=layout, backend="triton")
            return
        with record_launches():  # the forward's launches belong to the forward cases
            out = sma_attention(q, q, q, bias=bias, layout=layout, backend="triton")
        out.sum().backward()

    return run


def _joint_cases(block_d, dtype, prefix, backward):
    from mild_kernels.sma.configs import head_dim_class

    for model, (head_dim, text) in JOINT_TEXT_TOKENS.items():
        if dtype != torch.float32 and head_dim_class(head_dim) == block_d:
            yield (f"{prefix}[d{block_d},{TORCH_TO_TRITON[dtype]},many,D{head_dim},R5,soft,joint-{model}]",
                   joint_launch(head_dim, text, dtype, backward))


# Multi-adapter LoRA: K = N landing in each output-width class, rows aligned to 16 elements as
# at SD widths; rank = padded rank - 3 (a tail, and the unaligned rank stride of the worst case).
GATE_LORA_WIDTHS = {64: 80, 128: 128}


def multi_lora_launch(dtype, rank, width):
    """A thunk: one training step of multi_lora_linear, so the forward (bias, per-adapter
    scales, shrink stored: the variant with the most live state), the dx launch and both
    adapter-gradient launches are all recorded."""
    from mild_kernels import multi_lora_linear

    def run():
        x = torch.randn(2, 37, width).to(dtype).requires_grad_()
        weight, bias = torch.randn(width, width).to(dtype), torch.randn(width).to(dtype)
        lora_a = torch.randn(3, rank, width).to(dtype).requires_grad_()
        lora_b = torch.randn(3, width, rank).to(dtype).requires_grad_()
        y = multi_lora_linear(x, weight, bias, lora_a, lora_b, torch.tensor([2, -1]), torch.rand(3),
                              backend="triton")
        y.sum().backward()

    return run


def multi_lora_cases():
    """(name, thunk) for every shipped multi-LoRA GEMM and gradient config."""
    from mild_kernels.multi_lora.triton_lora import GEMM_CONFIGS

    for is_fp32, block_r, width_class in sorted(GEMM_CONFIGS):
        dtypes = (torch.float32,) if is_fp32 else (torch.float16, torch.bfloat16)
        for dtype in dtypes:
            if dtype == torch.bfloat16 and block_r != 64:  # codegen as fp16's; compile the heaviest rank only
                continue
            name = f"multi_lora[{TORCH_TO_TRITON[dtype]},r{block_r},n{width_class}]"
            yield name, multi_lora_launch(dtype, block_r - 3, GATE_LORA_WIDTHS[width_class])


# Fused step and layer composite: each scheduler family's kernel in its heaviest variant
# per dtype (blend, per-row guidance, noise, second order), plus the other prediction types.
GATE_STEP_VARIANTS = [
    # (name, scheduler class name, config, DDIM eta, steps to record, dtypes)
    ("ddim,eps,clip,noise", "DDIMScheduler", dict(clip_sample=True), 0.5, 1, ("fp32", "fp16", "bf16")),
    ("ddim,sample", "DDIMScheduler", dict(prediction_type="sample"), 0.0, 1, ("fp32",)),
    ("ddim,v", "DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False), 0.0, 1, ("fp32",)),
    ("euler,eps", "EulerDiscreteScheduler", dict(), 0.0, 1, ("fp32", "fp16", "bf16")),
    ("euler,v", "EulerDiscreteScheduler", dict(prediction_type="v_prediction"), 0.0, 1, ("fp32",)),
    ("dpm,eps,1st+2nd", "DPMSolverMultistepScheduler", dict(), 0.0, 2, ("fp32", "fp16", "bf16")),
    ("dpm,v,1st+2nd", "DPMSolverMultistepScheduler", dict(prediction_type="v_prediction"), 0.0, 2, ("fp32",)),
    ("flow", "FlowMatchEulerDiscreteScheduler", dict(), 0.0, 1, ("fp32", "fp16", "bf16")),
]
TRITON_TO_TORCH = {v: k for k, v in TORCH_TO_TRITON.items()}


def fused_step_launch(scheduler_name, config, eta, steps, dtype):
    """A thunk: ``steps`` fused steps with per-row guidance and the known-region blend."""
    import diffusers

    from mild_kernels import FusedStep, KnownRegion

    def run():
        scheduler = getattr(diffusers, scheduler_name)(**config)
        scheduler.set_timesteps(10)
        fused = FusedStep(scheduler, eta=eta, backend="triton")
        x = torch.randn(3, 4, 9, 7).to(dtype)
        known = KnownRegion(torch.randn_like(x), torch.rand(3, 1, 9, 7).to(dtype), torch.randn_like(x))
        for t in scheduler.timesteps[:steps]:
            fused.step(torch.randn_like(x), torch.randn_like(x), t, x, torch.rand(3),
                       noise=torch.randn_like(x) if eta > 0 else None, known_region=known)

    return run


def fused_step_cases():
    """(name, thunk) for the fused-step kernels: every scheduler family and dtype."""
    for name, scheduler_name, config, eta, steps, dtypes in GATE_STEP_VARIANTS:
        for dtype in dtypes:
            yield (f"fused_step[{name},{dtype}]",
                   fused_step_launch(scheduler_name, config, eta, steps, TRITON_TO_TORCH[dtype]))


def composite_launch(dtype, mask_dtype):
    from mild_kernels import composite_layers

    def run():
        composite_layers(torch.randn(3, 2, 3, 9, 7).to(dtype), torch.rand(3, 2, 1, 9, 7).to(mask_dtype),
                         torch.randn(2, 3, 9, 7).to(dtype), torch.rand(2, 1, 9, 7).to(mask_dtype), backend="triton")

    return run


def composite_cases():
    """(name, thunk) for the composite kernel: each image dtype, with same-dtype and fp32 masks."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mask_dtype in dict.fromkeys((dtype, torch.float32)):
            name = f"composite[{TORCH_TO_TRITON[dtype]},mask-{TORCH_TO_TRITON[mask_dtype]}]"
            yield name, composite_launch(dtype, mask_dtype)


CASES = [sma_forward_cases, sma_backward_cases]
CASES.append(multi_lora_cases)
CASES += [fused_step_cases, composite_cases]


# ---------------------------------------------------------------- compiling
_JOBS: list = []  # filled before the worker pool forks; kernels do not pickle


def compile_one(index):
    """Compile one recorded launch for one target exactly as the JIT would (mild_kernels._aot)."""
    import warnings

    from mild_kernels import _aot

    name, launch, arch = _JOBS[index]
    row = {"case": name, "kernel": launch.kernel.__name__, "arch": f"sm_{arch}", "num_warps": launch.num_warps,
           "num_stages": launch.num_stages, "maxnreg": launch.options_for(arch).get("maxnreg")}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice
            compiled = _aot.compile_launch(launch, arch)
    except Exception as error:  # e.g. ptxas cannot fit a register cap: the config fails, the run goes on
        return {**row, "error": str(error).strip().splitlines()[-1][:300], "ctas_per_sm": 0}
    usage = _aot.resource_usage(compiled)
    return {**row, "ctas_per_sm": _aot.ctas_per_sm(usage["reg"], usage["shared"], launch.num_warps, arch), **usage}


# The quick gate (the default test run): the SMA kernels in fp16 at the head dims SD 1.5 and
# SDXL run (40, 80, 160; 64), plain variant; every other kernel whole. The full gate
# (`pytest --full-gate`, CI) compiles every shipped config.
QUICK_HEAD_DIMS = (40, 64, 80, 160)


def in_quick_gate(case: str) -> bool:
    match = re.match(r"sma_(?:fwd|bwd)\[d\d+,(\w+),(\w+),D(\d+),", case)
    return not match or (match[1] == "fp16" and match[2] == "plain" and int(match[3]) in QUICK_HEAD_DIMS)


def quick_config(block_d: int, is_fp32: bool, variant: str) -> bool:
    """Whether the quick gate compiles any case of this config-table entry."""
    head_dims = (GATE_HEAD_DIMS_FP32 if is_fp32 else GATE_HEAD_DIMS)[block_d]
    return not is_fp32 and variant == "plain" and any(d in QUICK_HEAD_DIMS for d in head_dims)


def collect_jobs(selected=None, archs=None, quick=False):
    """(case name, recorded launch, arch) for every distinct compile the selected cases need.

    Each architecture's launches are recorded under target_arch(arch), so they use the config
    tables the wrappers would pick on that GPU (sm_90's, or sm_80's).
    """
    from mild_kernels import _aot
    from mild_kernels._runtime import record_launches, target_arch

    jobs, seen = [], set()
    for arch in archs or TARGETS.values():
        for cases in CASES:
            for name, run in cases():
                if (selected and not any(s in name for s in selected)) or (quick and not in_quick_gate(name)):
                    continue
                with target_arch(arch), record_launches() as launches:
                    run()
                assert launches, f"{name}: the wrapper launched no Triton kernel"
                for launch in launches:
                    launch.kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                     for k, v in launch.kwargs.items()}
                    signature, constexprs, attrs = _aot.jit_signature(launch.kernel, launch.kwargs, arch)
                    key = (launch.kernel.__name__, repr(signature), repr(constexprs), repr(attrs),
                           repr(launch.options_for(arch)), arch)
                    if launch.kernel.__name__ in CONFIG_FREE:
                        first_tensor = next(v for v in launch.kwargs.values() if isinstance(v, torch.Tensor))
                        key = (launch.kernel.__name__, arch, *(launch.kwargs[c] for c in CONFIG_FREE[key[0]]),
                               first_tensor.dtype)
                    if key not in seen:
                        seen.add(key)
                        jobs.append((name, launch, arch))
    return jobs


# Per (arch, config key), the most stack bytes a thread may use, for configs that no candidate
# of tests/tune_configs.py got spill-free; every key not listed must not spill at all, and
# no head-dim class up to 128 may be listed but for R > 16 regions (tests/test_compile_gate.py).
KNOWN_SPILLS: dict = {
    # dQ's mixed launch at D=192..256: 16 B with soft regions, 160 B with hard labels (gated since
    # 2026-12-03; no candidate compiles without spills)
    ("sm_90", ("sma_bwd", 256, "fp16", "plain")): 160,
    ("sm_90", ("sma_bwd", 256, "fp16", "many")): 136,  # the same launch with 16 hard-label regions
    ("sm_80", ("sma_bwd", 256, "fp32", "mass")): 8,  # dK/dV: one pointer, outside the loop
    # dQ's mixed kernel at D=256 on sm_80 since it became a kernel of its own (2026-12-03): already on
    # the last candidate (16 x 16, one stage), ptxas spills a few values
    ("sm_80", ("sma_bwd", 256, "fp16", "many")): 8,
    ("sm_80", ("sma_bwd", 256, "fp32", "many")): 16,
    ("sm_80", ("sma_bwd", 256, "fp32", "plain")): 24,
    # dK/dV at D=80 with R > 16 regions: every candidate spills. Found when D=80 got a class of its
    # own; class 96 compiled its wide variant at D=96 only, so this spill was never gated before.
    ("sm_90", ("sma_bwd", 80, "fp16", "wide")): 32,
}


def config_key(case: str):
    """("sma_bwd", 128, "fp16", "plain") from a case name "sma_bwd[d128,fp16,plain,D80,R4,soft]"."""
    match = re.fullmatch(r"(\w+)\[d(\d+),(\w+),(\w+),.*\]", case)
    return match and (match[1], int(match[2]), match[3], match[4])


def failures(row, known_spills=None) -> list[str]:
    """What fails the gate; ``known_spills`` defaults to KNOWN_SPILLS ({} allows no spill)."""
    known_spills = KNOWN_SPILLS if known_spills is None else known_spills
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    problems = []
    spill = row.get("local", 0) + row.get("stack", 0)
    if spill > known_spills.get((row["arch"], config_key(row["case"])), 0):
        problems.append(f"spills: local={row.get('local', 0)} stack={row.get('stack', 0)}")
    limit = SHARED_LIMIT[int(row["arch"][3:])]
    if row.get("shared", 0) > limit:
        problems.append(f"shared memory {row['shared']} > {limit}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write one row per compiled kernel here")
    parser.add_argument("--only", nargs="*", help="substrings of case names to compile")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="the SMA kernels at SD's head dims only (see QUICK_HEAD_DIMS)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)

    _JOBS[:] = collect_jobs(args.only, quick=args.quick)
    print(f"compiling {len(_JOBS)} kernels for {', '.join(TARGETS)} with {args.workers} worker(s)", flush=True)
    context = multiprocessing.get_context("fork")
    rows, bad = [], 0
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        for done, row in enumerate(pool.map(compile_one, range(len(_JOBS))), 1):
            rows.append(row)
            problems = failures(row)
            bad += bool(problems)
            print(f"[{done}/{len(_JOBS)}] {row['case']:<52} {row['kernel']:<22} {row['arch']} warps={row['num_warps']} "
                  f"stages={row['num_stages']} reg={row.get('reg')} CTAs/SM={row['ctas_per_sm']} "
                  f"shared={row.get('shared')} spill={row.get('local', 0) + row.get('stack', 0)}"
                  + (f"  FAIL: {'; '.join(problems)}" if problems else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} kernels compiled, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
