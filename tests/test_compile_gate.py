"""Every shipped Triton config compiles for sm_80 and sm_90 with no spills (no GPU needed).

The compile itself runs in a subprocess that tests/conftest.py starts at collection
time, so it overlaps the interpreter tests; see tests/compile_gate.py.
"""

import compile_gate
from mild_kernels.sma.triton_backward import BACKWARD_CONFIGS
from mild_kernels.sma.triton_forward import FORWARD_CONFIGS


def test_every_shipped_config_compiles_without_spills(compile_gate_run):
    returncode, output, rows = compile_gate_run
    print(output)
    failed = [line for line in output.splitlines() if "FAIL" in line]
    assert returncode == 0 and not failed, "\n".join(failed) or output[-3000:]
    assert {row["arch"] for row in rows} == set(f"sm_{a}" for a in compile_gate.TARGETS.values())
    for row in rows:
        assert not compile_gate.failures(row)
        assert 0 < row["reg"] <= 255


def test_gate_covers_every_config_table_entry(compile_gate_run):
    _, _, rows = compile_gate_run
    compiled = {row["case"] for row in rows}
    for prefix, table in (("sma_fwd", FORWARD_CONFIGS), ("sma_bwd", BACKWARD_CONFIGS)):
        for block_d, is_fp32, variant in table:
            dtype = "fp32" if is_fp32 else "fp16"
            assert any(name.startswith(f"{prefix}[d{block_d},{dtype},{variant},") for name in compiled), \
                f"{prefix} config {(block_d, is_fp32, variant)} was not compiled"
