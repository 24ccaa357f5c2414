"""The static speed report (benchmarks/static_speed.py) and the SASS analysis under it (mild_kernels/_aot.py).

The report compiles kernels, which interpreted kernels cannot be, so it runs in a
subprocess with TRITON_INTERPRET unset (as the compile gate does); the SASS parser and
the occupancy arithmetic are plain Python and run here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mild_kernels import _aot

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ("plain_fwd", "plain_bwd_dkdv", "plain_bwd_dq")


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sm90_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("static_speed") / "rows.json"
    proc = _run("-m", "benchmarks.static_speed", "--arch", "90", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def test_plain_kernels_run_wgmma_main_loops_without_spills(sm90_rows):
    for name in PLAIN:
        rows = [row for row in sm90_rows if row["name"] == name]
        assert rows and all(row["loop"] is not None for row in rows), f"{name}: no main loop"
        for row in rows:
            assert row["spill"] == 0, row
            assert row["wgmma"] > 0 and row["mma_sync"] == 0, row
            assert row["ctas_per_sm"] >= 1 and 0 < row["reg"] <= 255
            # One exp2 per score per thread at least: BLOCK_M * BLOCK_N scores over the CTA's threads.
            assert row["mufu_ex2"] >= row["pairs_per_iteration"] // (32 * row["num_warps"])
            assert row["warp_instructions_per_1k_pairs"] > 0


# The SMA kernels against the plain flash kernels compiled in the same run, at the headline
# shape (bf16, D=64, N=4096, R=4, region-sorted tokens, nothing blocked): budgets on
# warp-instructions per (q, k) pair of the steady-state (pure) loop. The figures today are
# in benchmarks/NOTES.md; the budgets leave a little room for Triton versions.
SMA_BUDGETS = {"sma_fwd_hard": 1.10, "sma_fwd_soft": 1.10, "sma_dkdv_hard": 1.30, "sma_dq_hard": 1.30}
BACKWARD_BUDGET = 1.30  # dK/dV and dQ together, per pair, against the plain backward


def _head_dim(entry: str) -> int:
    tail = entry.rsplit("_", 1)[-1]
    return int(tail[1:]) if tail[0] == "d" and tail[1:].isdigit() else 64


def _rows(rows, name):
    found = [row for row in rows if row["entry"] == name and row["loop"] is not None]
    assert found, f"{name}: no main loop"
    return found


def test_sma_steady_state_within_budget_of_plain_flash(sm90_rows):
    for name, budget in SMA_BUDGETS.items():
        (row,) = _rows(sm90_rows, name)  # aligned regions: the pure loop only
        assert row["ratio"] <= budget, f"{name}: {row['ratio']:.2f}x the plain kernel's instructions per pair"
        assert row["tensor_efficiency"] == 1.0, row  # no padded or repeated tensor work
    per_1k = {name: _rows(sm90_rows, name)[0]["warp_instructions_per_1k_pairs"]
              for name in ("sma_dkdv_hard", "sma_dq_hard", "plain_bwd_dkdv", "plain_bwd_dq")}
    ratio = (per_1k["sma_dkdv_hard"] + per_1k["sma_dq_hard"]) / (per_1k["plain_bwd_dkdv"] + per_1k["plain_bwd_dq"])
    assert ratio <= BACKWARD_BUDGET, f"backward: {ratio:.2f}x the plain backward per pair"


# Every other head dim, per (q, k) pair of the steady-state loop, against the plain kernel of the
# same head dim in its strongest spill-free tiles (plain_flash.TILES; 40, 80 and 160 in the
# same two head-dim blocks as SMA). The D=128 forward's budget is issue 19's target; the rest are
# today's figures (benchmarks/NOTES.md) plus ~5%, so that a change that makes one slower fails
# here. dK/dV at 80, 128 and 160 also stay within issue 19's 1.3x with no repeated product, and at
# 80 and 128 on tiles of at least 64 x 64 (D=128: 128 queries by 64 keys, scores queries-first).
HEAD_DIM_BUDGETS = {
    "sma_fwd_d40": 0.94, "sma_dkdv_d40": 1.08, "sma_dq_d40": 1.04,
    "sma_fwd_d80": 1.11, "sma_dkdv_d80": 1.25, "sma_dq_d80": 1.22,
    "sma_fwd_d128": 1.05, "sma_dkdv_d128": 1.17, "sma_dq_d128": 1.18,
    "sma_fwd_d160": 1.05, "sma_dkdv_d160": 1.24, "sma_dq_d160": 1.16,
}


def test_every_head_dim_within_its_budget(sm90_rows):
    for name, budget in HEAD_DIM_BUDGETS.items():
        _, role, dim = name.split("_")
        for row in _rows(sm90_rows, name):
            assert row["baseline"] == {"fwd": "plain_fwd", "dkdv": "plain_bwd_dkdv", "dq": "plain_bwd_dq"}[role] + "_" + dim
            assert row["ratio"] <= budget, f"{name}: {row['ratio']:.2f}x its baseline {row['baseline']} per pair"
    for head_dim in (80, 128, 160):
        for row in _rows(sm90_rows, f"sma_dkdv_d{head_dim}"):
            assert row["ratio"] <= 1.3 and row["tensor_efficiency"] == 1.0 and row["spill"] == 0, row
            assert head_dim == 160 or (row["block_m"] >= 64 and row["block_n"] >= 64), row
    (row,) = _rows(sm90_rows, "sma_fwd_d128")
    assert row["baseline"] == "plain_fwd_d128" and (row["block_m"], row["block_n"]) == (128, 128), row
    assert row["spill"] == 0 and row["tensor_efficiency"] == 1.0, row


def test_plain_baselines_at_every_head_dim_compile_without_spills(sm90_rows):
    """A baseline that spills would flatter SMA: the plain rows pass the compile gate's own rule."""
    for head_dim in (40, 80, 128, 160):
        for kernel in ("plain_fwd", "plain_bwd_dkdv", "plain_bwd_dq"):
            rows = _rows(sm90_rows, f"{kernel}_d{head_dim}")
            assert all(row["spill"] == 0 and row["wgmma"] > 0 and row["mma_sync"] == 0 for row in rows), rows


# Region boundaries (the headline's "bnd" entries): their mixed launches and branches carry the
# bias dot, the element mask and the key tail. Today's figures (NOTES.md: 1.43x, 1.84x, 2.23x for
# the mixed forward, dK/dV and dQ) plus ~5%; their pure launches are held by SMA_BUDGETS' level.
BOUNDARY_BUDGETS = {"sma_fwd_bnd": 1.50, "sma_dkdv_bnd": 1.93, "sma_dq_bnd": 2.34}


def test_boundary_launches_within_budget(sm90_rows):
    for name, budget in BOUNDARY_BUDGETS.items():
        rows = _rows(sm90_rows, name)
        assert len(rows) == 2, f"{name}: a mixed and a pure loop expected, got {len(rows)}"
        assert max(row["ratio"] for row in rows) <= budget, [round(row["ratio"], 2) for row in rows]
        assert min(row["ratio"] for row in rows) <= SMA_BUDGETS[name.replace("_bnd", "_hard")]


# Diffusion transformers' joint attention at 1024 x 1024 (benchmarks/static_speed.py's "flux" and
# "sd3" entries: four boundary image regions and a text region, R = 5, "many" configs): the
# steady-state (pure) loop and the mixed one, each today's figure (NOTES.md) plus ~5%. FLUX's
# dK/dV runs D=128's 32 x 64 tiles (issue 19); SD3's 4429 tokens get no divisibility hint.
JOINT_BUDGETS = {  # entry: (pure loop, mixed loop)
    "sma_fwd_flux": (1.05, 1.98), "sma_dkdv_flux": (1.18, 1.78), "sma_dq_flux": (1.19, 3.03),
    "sma_fwd_sd3": (1.06, 1.61), "sma_dkdv_sd3": (1.31, 2.48), "sma_dq_sd3": (1.21, 2.56),
}


def test_transformer_joint_attention_within_budget(sm90_rows):
    for name, (pure, mixed) in JOINT_BUDGETS.items():
        rows = _rows(sm90_rows, name)
        ratios = sorted(row["ratio"] for row in rows)
        assert len(rows) == 2 and ratios[0] <= pure and ratios[1] <= mixed, f"{name}: {[round(r, 2) for r in ratios]}"
        assert all(row["spill"] == 0 and row["wgmma"] > 0 and row["mma_sync"] == 0 for row in rows), name
    (flux,) = [row for row in _rows(sm90_rows, "sma_fwd_flux") if row["ratio"] <= 1.05]
    assert (flux["block_m"], flux["block_n"]) == (128, 128) and flux["tensor_efficiency"] == 1.0


def test_no_sma_loop_issues_atomics(sm90_rows):
    """The backward is bitwise repeatable because every gradient has one owner: no atomic add in
    any loop (the CPU interpreter runs programs one at a time, so only the SASS can show it)."""
    for row in sm90_rows:
        if row["entry"].startswith("sma_") and row["loop"] is not None:
            assert row["families"]["atomic"] == 0, row["name"]


def test_every_sma_matmul_loop_runs_on_wgmma_without_spills(sm90_rows):
    sma = [row for row in sm90_rows if row["entry"].startswith("sma_")]
    assert sma
    for row in sma:
        assert row["loop"] is not None, f"{row['name']}: no main loop"
        assert row["wgmma"] > 0 and row["mma_sync"] == 0, row["name"]
        assert row["spill"] == 0 or _head_dim(row["entry"]) > 128, row  # compile_gate.KNOWN_SPILLS: none to 128 at R = 4
    # The headline's forward keeps two CTAs (16 warps) a multiprocessor.
    assert all(row["ctas_per_sm"] >= 2 for name in ("sma_fwd_hard", "sma_fwd_soft") for row in _rows(sm90_rows, name))


def test_split_head_dims_pay_for_their_own_columns(sm90_rows):
    """SD 1.5's 80 and 160 run as 64+16 and 128+32: every tensor-core product is useful work."""
    for name in ("sma_fwd_d80", "sma_dkdv_d80", "sma_dq_d80", "sma_fwd_d160", "sma_dq_d160"):
        for row in _rows(sm90_rows, name):
            assert row["tensor_efficiency"] == 1.0, row
    for row in _rows(sm90_rows, "sma_fwd_d40"):  # 40 = 32 + 16: 48 columns, 8 of them padding
        assert row["tensor_efficiency"] >= 40 / 48 - 1e-9


def test_jit_signature_specialises_as_a_launch():
    proc = _run("-m", "mild_kernels._aot", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# cuobjdump prints branch targets as addresses, nvdisasm as labels: one loop, both ways.
SASS_ADDRESSES = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;      /* 0x00000a0000017a02 */
                                                                /* 0x000fe40000000f00 */
        /*0010*/              @!P0 BRA 0x90 ;                  /* 0x0000000000008947 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   MUFU.EX2 R10, R10 ;
        /*0040*/                   FFMA R3.reuse, R2, R4, -R5 ;
        /*0050*/              @!PT LDS RZ, [RZ] ;
        /*0060*/                   NOP ;
        /*0070*/                   MUFU.RCP R2, R2 ;
        /*0080*/               @P1 BRA 0x20 ;
        /*0090*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*00a0*/                   IADD3 R5, R5, 0x1, RZ ;
        /*00b0*/              @!P2 BRA 0x90 ;
        /*00c0*/                   BRA 0xc0;
"""
SASS_LABELS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   MUFU.EX2 R10, R10 ;
        /*0040*/                   FFMA R3.reuse, R2, R4, -R5 ;
        /*0050*/              @!PT LDS RZ, [RZ] ;
        /*0060*/                   NOP ;
        /*0070*/                   MUFU.RCP R2, R2 ;
        /*0080*/               @P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0090*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*00a0*/                   IADD3 R5, R5, 0x1, RZ ;
        /*00b0*/              @!P2 BRA `(.L_x_1) ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""


@pytest.mark.parametrize("text", [SASS_ADDRESSES, SASS_LABELS], ids=["addresses", "labels"])
def test_loops_from_sass(text):
    found = _aot.loops(text)
    assert [(loop.start, loop.end) for loop in found] == [(0x20, 0x80), (0x90, 0xb0)]
    main, other = found
    assert main.is_main and not other.is_main
    assert main.instructions == 5  # the NOP and the never-run @!PT LDS are not counted
    assert {k: v for k, v in main.families.items() if v} == {
        "wgmma": 1, "mufu_ex2": 1, "mufu": 1, "fp32": 1, "control": 1}
    assert {k: v for k, v in other.families.items() if v} == {"global_load": 1, "int/address": 1, "control": 1}
    assert _aot.main_loops(text) == [main]


def test_nested_loops_keep_the_innermost():
    text = "\n".join(f"        /*{a:04x}*/  {op} ;" for a, op in [
        (0x00, "IADD3 R1, R1, 0x1, RZ"), (0x10, "HMMA.16816.F32.BF16 R4, R8, R12, R4"),
        (0x20, "@P0 BRA 0x10"), (0x30, "@P1 BRA 0x0"), (0x40, "EXIT")])
    assert [(loop.start, loop.end, loop.families["mma_sync"]) for loop in _aot.loops(text)] == [(0x10, 0x20, 1)]


def test_ctas_per_sm():
    # 124 registers, 8 warps: 4096 registers a warp, 4 warps in each of 4 sub-partitions -> 2 CTAs;
    # 64 KiB + 1 KiB reserved of shared memory fits 3.
    assert _aot.ctas_per_sm(124, 65536, 8, 90) == 2
    assert _aot.ctas_per_sm(205, 66048, 8, 90) == 1  # 6656 registers a warp: 2 warps per sub-partition
    assert _aot.ctas_per_sm(32, 0, 4, 90) == 16      # the warp limit: 64 warps
    assert _aot.ctas_per_sm(16, 0, 1, 90) == 32      # the block limit
    assert _aot.ctas_per_sm(32, 100 * 1024, 4, 90) == 2 and _aot.ctas_per_sm(32, 100 * 1024, 4, 80) == 1
    assert _aot.ctas_per_sm(32, 228 * 1024, 4, 90) == 0  # more than a block may have
