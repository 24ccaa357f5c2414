"""The one-command benchmark harness runs end to end at tiny shapes on the CPU (claims no speed)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


@pytest.mark.slow  # a subprocess of ~10 s: CI's `pytest -m slow` runs it
def test_profile_e2e_train_cpu_smoke(tmp_path):
    """--train: both providers train a few steps of the tiny model and write their rows."""
    proc = subprocess.run([sys.executable, "benchmarks/profile_e2e.py", "--train", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "e2e_train.json").read_text())
    assert {r["provider"] for r in rows} == {"mild-train", "naive-train"} and {r["mode"] for r in rows} == {"train"}
    median = {(r["provider"], r["metric"]): r["q50"] for r in rows}
    for provider in ("mild-train", "naive-train"):
        for metric in ("samples_per_s", "stage_ms:forward", "stage_ms:backward", "stage_ms:optimizer",
                       "stage_ms:attention_fwd", "stage_ms:lora_fwd", "vae_encode_first_step_ms"):
            assert median[provider, metric] > 0, (provider, metric)
    # mild_kernels' custom ops are named in the backward pass too
    assert median["mild-train", "stage_ms:attention_bwd"] > 0 and median["mild-train", "stage_ms:lora_bwd"] > 0
    # same base weights and LoRA B = 0: at step 0 both compute the same loss, up to the attention's rounding
    mild, naive = median["mild-train", "loss_step0"], median["naive-train", "loss_step0"]
    assert math.isfinite(mild) and math.isclose(mild, naive, rel_tol=1e-3)
    assert median["mild-train", "speedup_vs_naive-train"] > 0
    assert (tmp_path / "e2e_train_throughput.png").exists() and (tmp_path / "e2e_train_stages.png").exists()


@pytest.mark.slow  # a subprocess of ~60 s (the compiled provider compiles the tiny UNet)
def test_mild_profile_step_measures_every_provider_per_step(tmp_path):
    """`mild profile --step`: per denoising step, every provider's time, host reads, launches
    and peak memory, the table with ratios to MILD eager, and the compiled step as one graph."""
    proc = subprocess.run([sys.executable, "-m", "mild", "profile", "--step", "--arch", "tiny", "--layers", "2",
                           "--steps", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "step.json").read_text())
    median = {(r["provider"], r["metric"]): r["q50"] for r in rows}
    providers = ("mild", "mild-compiled", "sequential", "dense-mask")
    assert {r["provider"] for r in rows} == set(providers)
    for provider in providers:
        assert median[provider, "ms_per_step"] > 0 and median[provider, "launches_per_step"] > 0
        assert median[provider, "host_reads_per_step"] >= 0
    # the sequential loop makes a UNet call per layer: more operator calls than one batched call
    assert median["sequential", "launches_per_step"] > median["mild", "launches_per_step"]
    table = (tmp_path / "step.md").read_text()
    assert table.startswith("| case | provider | ms / step | x mild |") and "| tiny L2 | mild | " in table


@pytest.mark.slow  # a subprocess of ~10 s: CI's `pytest -m slow` runs it
def test_mild_profile_writes_under_the_working_directory_and_names_it(tmp_path):
    """`mild profile` from any folder: results in ./mild_profile, every file named, no kineto lines."""
    proc = subprocess.run([sys.executable, "-m", "mild", "profile", "--cpu-smoke", "--layers", "1",
                           "--providers", "mild"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "mild_profile"
    written = sorted(p.name for p in out.iterdir())
    assert "e2e.json" in written and "e2e_throughput.png" in written and any(n.startswith("trace_") for n in written)
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("wrote mild_profile/: e2e.json") and "torch.profiler traces" in summary and "MB" in summary
    assert "USDT:" not in proc.stderr and "There are modules in" not in proc.stderr, proc.stderr[-2000:]
    assert not (ROOT / "mild_profile").exists()


@pytest.mark.slow  # a subprocess of ~15 s: CI's `pytest -m slow` runs it
def test_mild_profile_model_kind_profiles_flux_and_sd3(tmp_path):
    """`mild profile --model-kind flux sd3`: MILDTransformerPipeline (toy sizes on the CPU), SMA
    against diffusers' own processors, the denoiser's time read from its stage."""
    import json

    proc = subprocess.run([sys.executable, "-m", "mild", "profile", "--model-kind", "flux", "sd3", "--layers", "2",
                           "--steps", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "mild_profile" / "e2e.json").read_text())
    cases = {(r["x"], r["provider"]) for r in rows if r["metric"] == "images_per_s"}
    assert cases == {(f"{k}-tiny L2", p) for k in ("flux", "sd3") for p in ("mild", "mild-plain-attn")}
    assert all(r["q50"] > 0 for r in rows if r["metric"] in ("images_per_s", "stage_ms:unet"))
    attention = {r["provider"]: r["q50"] for r in rows if r["metric"] == "stage_ms:attention" and "flux" in r["x"]}
    assert attention["mild"] > 0 and attention["mild-plain-attn"] == 0  # SMA ran only where it should


@pytest.mark.slow  # a subprocess of ~10 s: CI's `pytest -m slow` runs it
def test_microbenchmarks_run_under_pytest_benchmark_with_the_shared_schema(tmp_path):
    """`pytest benchmarks --benchmark-only`: the CLI benchmarks' cases, each row tagged with the schema's fields."""
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:warnings",
                           "-k", "composite or multi_lora", f"--benchmark-json={report}",
                           f"--benchmark-storage={tmp_path / 'storage'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    runs = json.loads(report.read_text())["benchmarks"]
    assert {r["extra_info"]["kernel"] for r in runs} == {"composite_layers", "multi_lora_linear"}
    for run in runs:
        assert {"provider", "mode", "x", "params", "device", "torch", "commit"} <= set(run["extra_info"])
        assert run["stats"]["rounds"] >= 3 and run["stats"]["median"] > 0
    assert "mild-torch" in {r["extra_info"]["provider"] for r in runs}
