"""Pick the shipped Triton configs by compiling candidates ahead of time (no GPU).

For every config key, the candidates are tried in order of preference (larger tiles
first); the first that compiles for sm_80 and sm_90 with no spill in any kernel
variant it serves is kept, and keys with none are named (see compile_gate.KNOWN_SPILLS).
Prints the table to paste into the kernel module. The lists hold every shipped config.

    python tests/tune_configs.py forward     # or: backward; then optionally variants (plain ...)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

import compile_gate as gate  # noqa: E402
from mild_kernels._runtime import record_launches  # noqa: E402
from mild_kernels.sma import triton_backward, triton_forward  # noqa: E402
from mild_kernels.sma.triton_forward import VARIANTS  # noqa: E402

# op: (the module's config table, its config class, the gate's cases for one key)
OPS = {
    "forward": (triton_forward.FORWARD_CONFIGS, triton_forward.ForwardConfig, gate.sma_forward_cases),
    "backward": (triton_backward.BACKWARD_CONFIGS, triton_backward.BackwardConfig, gate.sma_backward_cases),
}

# Per op: candidates for 16-bit and for fp32 inputs, most preferred first. A fifth field is the
# fp32 dot precision (see ForwardConfig), a sixth the config's reload flag (reload_q forward,
# reload_kv backward).
CANDIDATES = {
    "forward": ([(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2),
                 (32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
                [(64, 32, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1, "tf32x3"),
                 (16, 16, 4, 1, "tf32x3"), (16, 16, 8, 1), (16, 16, 8, 1, "tf32x3"), (16, 16, 8, 2, "ieee", True)]),
    # dK/dV keeps a key tile (block_n) resident and walks query tiles (block_m). The sixth field
    # (reload_kv) rereads the key and value tiles per query tile.
    "backward": ([(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 1), (32, 32, 4, 2), (16, 32, 4, 1),
                  (16, 16, 4, 1), (16, 16, 8, 1), (16, 32, 4, 1, "ieee", True),
                  (16, 16, 4, 1, "ieee", True), (16, 16, 8, 1, "ieee", True)],
                 [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1, "tf32x3"), (16, 16, 8, 1, "ieee", True),
                  (16, 16, 8, 1, "tf32x3", True), (16, 16, 4, 1, "ieee", True)]),
}


def jobs_for(op, key, candidate):
    table, config_class, cases = OPS[op]
    table[key] = config_class(*candidate)
    jobs = []
    for name, run in cases([key]):
        with record_launches() as launches:
            run()
        for launch in launches:
            for arch in gate.TARGETS.values():
                jobs.append((name, launch, arch))
    return jobs


def main():
    op = sys.argv[1] if len(sys.argv) > 1 else "forward"
    variants = sys.argv[2:] or VARIANTS
    keys = [(d, f32, v) for d in gate.GATE_HEAD_DIMS for f32 in (False, True) for v in variants]
    position = {key: 0 for key in keys}
    chosen = {}
    context = multiprocessing.get_context("fork")
    while position:
        batch, owners = [], []
        for key, index in position.items():
            candidates = CANDIDATES[op][key[1]]
            jobs = jobs_for(op, key, candidates[index])
            batch += jobs
            owners += [key] * len(jobs)
        gate._JOBS[:] = batch
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
            rows = list(pool.map(gate.compile_one, range(len(batch))))
        failed = {owner for owner, row in zip(owners, rows) if gate.failures(row, known_spills={})}
        for key in list(position):
            candidates = CANDIDATES[op][key[1]]
            if key not in failed:
                chosen[key] = candidates[position.pop(key)]
                print(f"{key}: {chosen[key]}", file=sys.stderr, flush=True)
            elif position[key] + 1 == len(candidates):
                position.pop(key)
                print(f"{key}: NONE (no candidate compiles without spills)", file=sys.stderr, flush=True)
            else:
                position[key] += 1
    table, config_class, _ = OPS[op]
    print(f"{op.upper()}_CONFIGS = {{")
    for key in sorted(chosen):
        print(f"    {key!r}: {config_class.__name__}{chosen[key]!r},")
    print("}")


if __name__ == "__main__":
    main()
