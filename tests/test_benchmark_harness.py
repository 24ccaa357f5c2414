"""The one-command benchmark harness runs end to end at tiny shapes on the CPU (claims no speed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_cpu_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [s["status"] for s in stages] == ["ok"] * len(stages)
    for name in ("attention.json", "attention_fwd_bwd.json", "step.json", "e2e/e2e.json"):
        rows = json.loads((tmp_path / name).read_text())
        assert rows and all({"kernel", "provider", "metric", "q50", "device", "date"} <= set(r) for r in rows)
    e2e = json.loads((tmp_path / "e2e" / "e2e.json").read_text())
    assert {r["provider"] for r in e2e} == {"mild", "mild-plain-attn", "baseline"}
    assert list((tmp_path / "e2e").glob("trace_*.json")) and (tmp_path / "e2e" / "e2e_throughput.png").exists()
