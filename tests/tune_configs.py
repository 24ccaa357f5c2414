"""Pick the shipped SMA Triton configs by compiling candidates ahead of time (no GPU).

Each config key (head-dim class, fp32 inputs, variant) holds one KernelConfig per launch
role: the forward's pure and mixed launches, the backward's dK/dV launch and dQ's pure and
mixed launches. For every (key, role) the candidates are tried in order of preference
(larger tiles, more stages first); the first whose launches compile for the architecture
with no spill, in every case of the compile gate for that key, is kept. Roles tune
independently: a launch's registers depend only on its own config. sm_90 and sm_80 have
tables of their own (mma.sync needs more registers than wgmma for the same tiles).

    python tests/tune_configs.py [forward|backward] [--arch 90|80] [--keys 64,False,plain ...]
    python tests/tune_configs.py backward --arch 80 --retune gate.json   # only what the gate failed

``--retune`` takes the rows of ``compile_gate.py --json`` and resumes each failing (key, role)
at the candidate after the one it ships with.

Prints the tables to paste into mild_kernels/sma/configs.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

import compile_gate as gate  # noqa: E402
from mild_kernels._runtime import record_launches, target_arch  # noqa: E402
from mild_kernels.sma import configs  # noqa: E402
from mild_kernels.sma.configs import KernelConfig  # noqa: E402

# role: the kernel that runs it
ROLES = {
    "forward": {"pure": "_sma_fwd_pure_kernel", "mixed": "_sma_fwd_mixed_kernel"},
    "backward": {"dkdv": "_sma_bwd_dkdv_kernel", "dq": "_sma_bwd_dq_pure_kernel", "dq_mixed": "_sma_bwd_dq_mixed_kernel"},
}
TABLES = {("forward", 90): configs.FORWARD_CONFIGS, ("forward", 80): configs.FORWARD_CONFIGS_SM80,
          ("backward", 90): configs.BACKWARD_CONFIGS, ("backward", 80): configs.BACKWARD_CONFIGS_SM80}
CASES = {"forward": gate.sma_forward_cases, "backward": gate.sma_backward_cases}

# KernelConfig fields: block_m, block_n, num_warps, num_stages, maxnreg, fp32_precision.
# Past the tiles that fit one warpgroup's registers, 8 warps split the accumulators (D >= 160).
WIDE = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2),
        (32, 16, 4, 2), (16, 32, 4, 2), (32, 16, 8, 2), (16, 16, 8, 2), (16, 16, 4, 1)]
CANDIDATES_16 = {
    "pure": [(128, 64, 8, 3, 128), (128, 64, 8, 2, 128)] + WIDE,
    "mixed": WIDE,
    # dK/dV: block_m queries per iteration, block_n keys per program (at most the 64 of a layout tile).
    # A wgmma needs 64 rows a warpgroup: key blocks of 64 on one warpgroup, the query block shrinking first.
    # One stage frees the registers that let D=160 run 4 warps (one warpgroup: no product repeated).
    "dkdv": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2), (16, 64, 4, 1), (64, 32, 4, 2),
             (32, 32, 4, 2), (16, 32, 4, 2), (32, 64, 8, 2), (16, 64, 8, 2), (16, 16, 4, 1)],
    "dq": WIDE,
    "dq_mixed": WIDE,
}
# fp32: three-pass TF32 on the tensor cores first, at any tile, then IEEE FMA (8 warps spread
# its registers: a 4-warp 32x32 IEEE tile can spill where an 8-warp 64x32 one does not).
CANDIDATES_32 = [(64, 64, 4, 2, None, "tf32x3"), (64, 32, 4, 2, None, "tf32x3"), (32, 32, 4, 2, None, "tf32x3"),
                 (64, 32, 8, 2, None, "tf32x3"), (16, 32, 4, 2, None, "tf32x3"), (32, 16, 4, 2, None, "tf32x3"),
                 (64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 2),
                 (16, 16, 4, 1)]


# The forward's pure launch at head-dim classes from 80 up tries the 128 x 128 tile first (a key
# block of two layout tiles, as Triton's tutorial runs D=128): one CTA fits a multiprocessor there
# at either tile, and the wider block halves the per-row softmax work per pair. At 64 and below,
# 128 x 64 keeps two CTAs a multiprocessor (one's softmax under the other's MMAs).
WIDE_PURE_FROM = 80
# dK/dV at head-dim classes from 128 up tries 128-query blocks on 8 warps first (sm_90 takes them at
# D=128 plain and many, one stage; sm_80 at D=128 plain, two stages): a block wider
# than the key block computes its scores queries-first (the kernel's QUERY_MAJOR), so both
# warpgroups split dK and dV without repeating a product, where keys-first must shrink the query
# block to fit one warpgroup's registers (D=128: 32 x 64, D=160: 16 x 64). Static, sm_90 (at one
# stage): D=128 544.9 -> 451.2 and D=160 992.2 -> 665.0 warp-instructions per 1k pairs; D=80 would
# go 420.9 -> 476.6 (the transposes staged through shared memory cost more than a 64 x 64 tile
# saves), so classes below 128 do not try it. sm_80 (D=128): 845.7 against 32 x 64's 775.4, which
# spills 8 B with no mixed tile, and 16 x 64's 1312.5 (efficiency 0.67).
QUERY_MAJOR_FROM = 128
QUERY_MAJOR_DKDV = [(128, 64, 8, 2), (128, 64, 8, 1)]


def candidates(role: str, is_fp32: bool, head_dim_class: int = 64) -> list[KernelConfig]:
    if is_fp32:
        return [KernelConfig(*c) for c in CANDIDATES_32]
    first = []
    if role == "pure" and head_dim_class >= WIDE_PURE_FROM:
        first = [(128, 128, 8, 2)]
    if role == "dkdv" and head_dim_class >= QUERY_MAJOR_FROM:
        first = QUERY_MAJOR_DKDV
    return [KernelConfig(*c) for c in first + CANDIDATES_16[role]]


def with_role(config, role: str, kernel_config: KernelConfig):
    import dataclasses

    return dataclasses.replace(config, **{role: kernel_config})


def jobs_for(op, arch, key, role, kernel_config):
    table = TABLES[(op, arch)]
    table[key] = with_role(table[key], role, kernel_config)
    name = ROLES[op][role]
    jobs = []
    for case, run in CASES[op]([key]):
        with target_arch(arch), record_launches() as launches:
            run()
        for launch in launches:
            if launch.kernel.__name__ == name:
                jobs.append((case, launch, arch))
    return jobs


def failing_roles(op: str, arch: int, rows) -> dict:
    """{(key, role): first candidate index to try} for the gate rows of ``op`` on ``arch`` that fail."""
    prefix = {"forward": "sma_fwd", "backward": "sma_bwd"}[op]
    starts = {}
    for row in rows:
        case_key = gate.config_key(row["case"])
        if row["arch"] != f"sm_{arch}" or not case_key or case_key[0] != prefix or not gate.failures(row, {}):
            continue
        key = (case_key[1], case_key[2] == "fp32", case_key[3])
        role = next((r for r, name in ROLES[op].items() if name == row["kernel"]), None)
        if role is None:  # a kernel with a fixed config (the backward's preprocess)
            continue
        options = candidates(role, key[1], key[0])
        shipped = getattr(TABLES[(op, arch)][key], role)
        starts[(key, role)] = options.index(shipped) + 1 if shipped in options else 0
    return starts


def tune(op: str, arch: int, keys, workers: int, starts=None, roles=None):
    """{(key, role): KernelConfig or None} for the first candidate of each that passes."""
    roles = roles or list(ROLES[op])
    pending = dict(starts) if starts is not None else {(key, role): 0 for key in keys for role in roles}
    pending = {owner: index for owner, index in pending.items() if index < len(candidates(owner[1], owner[0][1], owner[0][0]))}
    chosen = {}
    context = multiprocessing.get_context("fork")
    while pending:
        batch, owners = [], []
        for (key, role), index in pending.items():
            jobs = jobs_for(op, arch, key, role, candidates(role, key[1], key[0])[index])
            batch += jobs
            owners += [(key, role)] * len(jobs)
        gate._JOBS[:] = batch
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = list(pool.map(gate.compile_one, range(len(batch))))
        failed = {owner for owner, row in zip(owners, rows) if gate.failures(row, known_spills={})}
        for owner in list(pending):
            options = candidates(owner[1], owner[0][1], owner[0][0])
            if owner not in failed:
                chosen[owner] = options[pending.pop(owner)]
                print(f"{owner}: {chosen[owner]}", flush=True)
            elif pending[owner] + 1 == len(options):
                pending.pop(owner)
                chosen[owner] = None
                print(f"{owner}: NONE compiles without spills", flush=True)
            else:
                pending[owner] += 1
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=sorted(ROLES), nargs="?", default="forward")
    parser.add_argument("--keys", nargs="*", help="config keys as 64,False,plain")
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--roles", nargs="*", help="launch roles to tune (default: all of the op's)")
    parser.add_argument("--retune", metavar="GATE_JSON", help="resume only the (key, role) pairs this gate run failed")
    args = parser.parse_args()
    keys = sorted(TABLES[(args.op, args.arch)])
    if args.keys:
        wanted = {(int(d), f == "True", v) for d, f, v in (k.split(",") for k in args.keys)}
        keys = [key for key in keys if key in wanted]
    starts = None
    if args.retune:
        import json

        starts = failing_roles(args.op, args.arch, json.loads(Path(args.retune).read_text()))
        starts = {owner: index for owner, index in starts.items() if owner[0] in keys}
    chosen = tune(args.op, args.arch, keys, args.workers, starts, args.roles)
    print(f"{args.op}, sm_{args.arch}:")
    for key in keys:
        print(f"    {key!r}: " + ", ".join(f"{role}={chosen.get((key, role), 'kept')}" for role in ROLES[args.op]))


if __name__ == "__main__":
    main()
