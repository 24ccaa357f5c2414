"""Ahead-of-time compile gate: every shipped Triton kernel config, for sm_80 and sm_90, no GPU.

Each case drives a public wrapper on tiny CPU tensors inside ``record_launches()``,
so the gate compiles exactly the kernels, argument types and constexprs the
wrapper would launch. Each recorded launch is compiled with ``triton.compile`` for
every target, and the cubin's resource usage is read with the cuobjdump bundled
with Triton. A kernel fails the gate if it uses local memory or stack (register
spills) beyond its config's KNOWN_SPILLS budget (zero for all but a few backward
configs), or more shared memory than the target has.

Run as ``python tests/compile_gate.py [--json OUT]``; tests/test_compile_gate.py
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
import subprocess
import sys
import tempfile
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
# A head dim that pads to each block size, with a tail inside the block.
# Each head-dim class compiled at its heaviest member: the largest padded block, with a
# tail inside it (SD 1.5's 40, 80 and 160).
GATE_HEAD_DIMS = {64: 40, 128: 80, 256: 160}
# The heaviest kernel variants each config class serves: (soft, region mass, R). plain: hard
# labels without mass at R = 16; narrow: soft with mass (a superset of the other variants'
# work) at R = 16; wide (R = 64): both.
FORWARD_VARIANT_CASES = {
    "plain": [(False, False, 16)],
    "narrow": [(True, True, 16)],
    "wide": [(False, False, 64), (True, True, 64)],
}


# Backward variants: (soft, region-mass gradient, R, deterministic). deterministic=False
# launches the atomic-dq dK/dV kernel; deterministic=True the dK/dV kernel without atomics
# and the dq kernel. Both dK/dV kernels count: without its atomics ptxas allocates the
# kernel differently, and it spilled where the atomic one did not.
BACKWARD_VARIANT_CASES = {
    "plain": [(False, False, 16, False), (False, False, 16, True)],
    "narrow": [(True, True, 16, False), (True, True, 16, True)],
    "wide": [(False, False, 64, False), (False, False, 64, True), (True, True, 64, False), (True, True, 64, True)],
}


def sma_launch(block_d, soft, mass, R, dtype, backward=False, deterministic=False):
    """A thunk that drives sma_attention into one kernel variant (forward, or backward only)."""
    from mild_kernels import sma_attention
    from mild_kernels._runtime import record_launches

    def run():
        q = torch.randn(1, 2, 33, GATE_HEAD_DIMS[block_d]).to(dtype).requires_grad_(backward)
        labels = torch.randint(0, R, (33,))
        regions = torch.nn.functional.one_hot(labels, R).float() if soft else labels
        args = (q, q, q, regions, regions, torch.randn(R, R), torch.rand(R, R) > 0.5)
        if not backward:
            sma_attention(*args, return_region_mass=mass, backend="triton")
            return
        with record_launches():  # the forward's launches belong to the forward cases
            res = sma_attention(*args, return_region_mass=mass, backend="triton", deterministic=deterministic)
        loss = (res.out.sum() + res.region_mass.sum()) if mass else res.sum()
        loss.backward()

    return run


def _config_cases(table, variant_cases, prefix, backward):
    for key in sorted(table):
        block_d, is_fp32, variant = key
        for dtype in ((torch.float32,) if is_fp32 else (torch.float16,)):  # bf16's codegen is fp16's
            cases = variant_cases[variant]
            for soft, mass, R, *deterministic in cases:
                flags = ("soft" if soft else "hard") + (",mass" if mass else "") + (",det" if any(deterministic) else "")
                name = f"{prefix}[d{block_d},{TORCH_TO_TRITON[dtype]},{variant},R{R},{flags}]"
                yield name, sma_launch(block_d, soft, mass, R, dtype, backward, any(deterministic))


def sma_forward_cases(configs=None):
    """(name, thunk) for every shipped forward config and each kernel variant it serves."""
    from mild_kernels.sma.triton_forward import FORWARD_CONFIGS

    variant_cases = {v: [c + (False,) for c in cases] for v, cases in FORWARD_VARIANT_CASES.items()}
    yield from _config_cases(configs or FORWARD_CONFIGS, variant_cases, "sma_fwd", backward=False)


def sma_backward_cases(configs=None):
    """(name, thunk) for every shipped backward config and each kernel variant it serves."""
    from mild_kernels.sma.triton_backward import BACKWARD_CONFIGS

    yield from _config_cases(configs or BACKWARD_CONFIGS, BACKWARD_VARIANT_CASES, "sma_bwd", backward=True)


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
    from mild_kernels.multi_lora.triton_kernels import GEMM_CONFIGS

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
def signature_of(kernel, kwargs):
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = kwargs[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def resource_usage(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in usage.items()}


_JOBS: list = []  # filled before the worker pool forks; kernels do not pickle


def compile_one(index):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, kwargs, num_warps, num_stages, arch = _JOBS[index]
    signature, constexprs, attrs = signature_of(kernel, kwargs)
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    usage = resource_usage(compiled.asm["cubin"])
    usage["shared"] = max(usage.get("shared", 0), compiled.metadata.shared)
    return {"case": name, "kernel": kernel.__name__, "arch": f"sm_{arch}", "num_warps": num_warps,
            "num_stages": num_stages, **usage}


def collect_jobs(selected=None):
    from mild_kernels._runtime import record_launches

    jobs, seen = [], set()
    for cases in CASES:
        for name, run in cases():
            if selected and not any(s in name for s in selected):
                continue
            with record_launches() as launches:
                run()
            assert launches, f"{name}: the wrapper launched no Triton kernel"
            for launch in launches:
                kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in launch.kwargs.items()}
                signature, constexprs, _ = signature_of(launch.kernel, kwargs)
                key = (launch.kernel.__name__, repr(signature), repr(constexprs), launch.num_warps, launch.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                for arch in TARGETS.values():
                    jobs.append((name, launch.kernel, kwargs, launch.num_warps, launch.num_stages, arch))
    return jobs


# Backward configs for which no candidate of tests/tune_configs.py compiled without spills:
# the dK/dV kernel holds dK, dV, the dW partials and the region tiles at once, a known
# performance defect (not one of correctness; see benchmarks/NOTES.md). Per config key, the
# most stack bytes a thread may use, a little above what triton 3.9 gives today, so that
# the gate still fails if they grow; every key not listed must not spill at all.
KNOWN_SPILLS = {
    ("sma_bwd", 64, "fp16", "wide"): 128,
    ("sma_bwd", 64, "fp32", "wide"): 64,
    ("sma_bwd", 128, "fp16", "narrow"): 64,
    ("sma_bwd", 128, "fp16", "wide"): 384,
    ("sma_bwd", 128, "fp32", "narrow"): 64,
    ("sma_bwd", 256, "fp16", "plain"): 768,
    ("sma_bwd", 256, "fp16", "narrow"): 768,
    ("sma_bwd", 256, "fp16", "wide"): 1280,
    ("sma_bwd", 256, "fp32", "plain"): 64,
    ("sma_bwd", 256, "fp32", "narrow"): 256,
    ("sma_bwd", 256, "fp32", "wide"): 256,
}


def config_key(case: str):
    """("sma_bwd", 128, "fp16", "plain") from a case name "sma_bwd[d128,fp16,plain,R64,hard]"."""
    match = re.fullmatch(r"(\w+)\[d(\d+),(\w+),(\w+),.*\]", case)
    return match and (match[1], int(match[2]), match[3], match[4])


def failures(row, known_spills=None) -> list[str]:
    """What fails the gate; ``known_spills`` defaults to KNOWN_SPILLS ({} allows no spill)."""
    known_spills = KNOWN_SPILLS if known_spills is None else known_spills
    problems = []
    spill = row.get("local", 0) + row.get("stack", 0)
    if spill > known_spills.get(config_key(row["case"]), 0):
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
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)

    _JOBS[:] = collect_jobs(args.only)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        rows = list(pool.map(compile_one, range(len(_JOBS))))
    bad = 0
    for row in rows:
        problems = failures(row)
        bad += bool(problems)
        print(f"{row['case']:<44} {row['arch']} warps={row['num_warps']} stages={row['num_stages']} "
              f"reg={row.get('reg')} shared={row.get('shared')} local={row.get('local')} stack={row.get('stack')}"
              + (f"  FAIL: {'; '.join(problems)}" if problems else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} kernels compiled, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
