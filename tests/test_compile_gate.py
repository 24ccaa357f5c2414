"""Every shipped Triton config compiles for sm_80 and sm_90 with no spills beyond its known
budget (compile_gate.KNOWN_SPILLS: a few configs above D=128; zero for the rest), no GPU needed.

The compile itself runs in a subprocess that tests/conftest.py starts at collection
time, so it overlaps the interpreter tests; see tests/compile_gate.py. The default run
compiles the quick gate (SMA at SD's head dims, every other kernel whole, ~170 kernels);
``pytest --full-gate tests/test_compile_gate.py`` (CI) compiles all ~500.
"""

import compile_gate
from mild_kernels.sma.configs import BACKWARD_CONFIGS, BACKWARD_CONFIGS_SM80, FORWARD_CONFIGS, FORWARD_CONFIGS_SM80


def test_every_shipped_config_compiles_within_its_spill_budget(compile_gate_run):
    returncode, output, rows = compile_gate_run
    print(output)
    failed = [line for line in output.splitlines() if "FAIL" in line]
    assert returncode == 0 and not failed, "\n".join(failed) or output[-3000:]
    assert {row["arch"] for row in rows} == set(f"sm_{a}" for a in compile_gate.TARGETS.values())
    for row in rows:
        assert not compile_gate.failures(row)
        assert 0 < row["reg"] <= 255


def test_gate_covers_every_config_table_entry(compile_gate_run, request):
    """The full gate compiles every config-table entry; the quick gate every entry it selects."""
    _, _, rows = compile_gate_run
    full = request.config.getoption("--full-gate")
    for arch, tables in ((90, (FORWARD_CONFIGS, BACKWARD_CONFIGS)), (80, (FORWARD_CONFIGS_SM80, BACKWARD_CONFIGS_SM80))):
        compiled = {row["case"] for row in rows if row["arch"] == f"sm_{arch}"}
        kernels = {row["kernel"] for row in rows if row["arch"] == f"sm_{arch}"}
        assert {"_sma_fwd_mixed_kernel", "_sma_fwd_pure_kernel", "_sma_bwd_dq_mixed_kernel", "_sma_bwd_dq_pure_kernel",
                "_sma_bwd_dkdv_kernel", "_multi_lora_kernel",
                "_composite_kernel", "_ddim_step_kernel"} <= kernels
        for prefix, table in zip(("sma_fwd", "sma_bwd"), tables):
            selected = [entry for entry in table if full or compile_gate.quick_config(*entry)]
            assert selected, f"the gate compiles no {prefix} config for sm_{arch}"
            for block_d, is_fp32, variant in selected:
                dtype = "fp32" if is_fp32 else "fp16"
                assert any(name.startswith(f"{prefix}[d{block_d},{dtype},{variant},") for name in compiled), \
                    f"{prefix} config {(block_d, is_fp32, variant)} was not compiled for sm_{arch}"


def test_known_spills_are_current(compile_gate_run, request):
    """A KNOWN_SPILLS entry names a shipped config above D=128 that still spills: fixed ones leave the list
    (checked where the gate compiled the entry's config: every entry in the full gate)."""
    _, _, rows = compile_gate_run
    full = request.config.getoption("--full-gate")
    worst = {}
    for row in rows:
        key = (row["arch"], compile_gate.config_key(row["case"]))
        worst[key] = max(worst.get(key, 0), row.get("local", 0) + row.get("stack", 0))
    tables = {("sm_90", "sma_fwd"): FORWARD_CONFIGS, ("sm_90", "sma_bwd"): BACKWARD_CONFIGS,
              ("sm_80", "sma_fwd"): FORWARD_CONFIGS_SM80, ("sm_80", "sma_bwd"): BACKWARD_CONFIGS_SM80}
    for (arch, (prefix, block_d, dtype, variant)), budget in compile_gate.KNOWN_SPILLS.items():
        # Up to D=128 only the wide variant (R > 16 regions) may: D=80's dK/dV (compile_gate.KNOWN_SPILLS)
        assert block_d > 128 or variant == "wide", f"{arch} {prefix} d{block_d}: no head-dim class up to 128 may spill"
        assert (block_d, dtype == "fp32", variant) in tables[(arch, prefix)]
        if not (full or compile_gate.quick_config(block_d, dtype == "fp32", variant)):
            continue
        key = (arch, (prefix, block_d, dtype, variant))
        assert worst.get(key, 0) > 0, f"{key} no longer spills: remove it from KNOWN_SPILLS"
        assert worst[key] <= budget
