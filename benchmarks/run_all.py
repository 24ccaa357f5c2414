"""Everything that needs a GPU, in one command that fits one 10-minute device call.

    python -m benchmarks.run_all             # on a GPU: build csrc, GPU tests, every benchmark, e2e
    python -m benchmarks.run_all --cpu-smoke # the same harness at tiny shapes on the CPU (CI)

Stages run in order of value (correctness first, then the headline numbers), each in
its own process with a time limit; what does not fit the budget is reported as skipped.
Logs, result JSON, plots and traces go under benchmarks/results/<device>/, and the
summary table in benchmarks/README.md is rewritten from them (GPU runs only).
``benchmarks/gpu_run.sh`` wraps this for a machine without network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_slug, environment, on_gpu  # noqa: E402

# (name, command, seconds allowed); "{out}" is the results folder.
GPU_STAGES = [
    ("build-csrc", ["make", "-C", "csrc"], 60),
    ("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-x", "--ignore=tests/test_compile_gate.py", "tests"], 150),
    ("attention-fwd", [sys.executable, "-m", "benchmarks.bench_attention", "--out", "{out}"], 90),
    ("e2e-target", [sys.executable, "benchmarks/profile_e2e.py", "--arch", "sdxl", "--layers", "4", "--steps", "30",
                    "--out", "{out}/e2e-sdxl"], 120),
    # eager, compiled and CUDA graphs against the loop and dense mask; rows are written as they come,
    # so a cut keeps sd15's (SDXL's two inductor compiles may not fit)
    ("e2e-step", [sys.executable, "benchmarks/profile_e2e.py", "--step", "--arch", "sd15", "sdxl", "--layers", "3",
                  "--out", "{out}/e2e-step"], 150),
    ("attention-fwd-bwd", [sys.executable, "-m", "benchmarks.bench_attention", "--mode", "fwd+bwd", "--out", "{out}"],
     60),
    ("step", [sys.executable, "-m", "benchmarks.bench_step", "--out", "{out}"], 30),
    ("lora", [sys.executable, "-m", "benchmarks.bench_lora", "--out", "{out}"], 30),
    ("e2e-sd15", [sys.executable, "benchmarks/profile_e2e.py", "--arch", "sd15", "--layers", "1", "2", "4", "8",
                  "--steps", "20", "--out", "{out}/e2e-sd15"], 90),
    ("attention-flux", [sys.executable, "-m", "benchmarks.bench_attention", "--shapes", "flux", "--out", "{out}"], 40),
    ("attention-sd3", [sys.executable, "-m", "benchmarks.bench_attention", "--shapes", "sd3", "--out", "{out}"], 40),
]
CPU_STAGES = [
    ("attention", [sys.executable, "-m", "benchmarks.bench_attention", "--quick", "--out", "{out}"], 300),
    ("attention-fwd-bwd", [sys.executable, "-m", "benchmarks.bench_attention", "--quick", "--mode", "fwd+bwd",
                           "--providers", "mild-torch", "sdpa-mask", "--out", "{out}"], 300),
    ("step", [sys.executable, "-m", "benchmarks.bench_step", "--quick", "--out", "{out}"], 300),
    ("lora", [sys.executable, "-m", "benchmarks.bench_lora", "--quick", "--out", "{out}"], 300),
    ("e2e", [sys.executable, "benchmarks/profile_e2e.py", "--cpu-smoke", "--layers", "1", "--out", "{out}/e2e"], 600),
]
HEADLINE_METRICS = ("tflops", "speedup_vs_", "images_per_s", "gbps", "fraction_of_copy", "ratio_to_base")


def run_stage(name, command, seconds, out: Path, deadline: float) -> dict:
    left = deadline - time.monotonic()
    if left < min(seconds, 20):
        return {"stage": name, "status": "skipped (budget)", "seconds": 0}
    command = [part.replace("{out}", str(out)) for part in command]
    log = out / f"log_{name}.txt"
    start = time.monotonic()
    try:
        with log.open("w") as handle:
            proc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=min(seconds, left), env=dict(os.environ, PYTHONUNBUFFERED="1"))
        status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
    except subprocess.TimeoutExpired:
        status = "timed out"
    except FileNotFoundError as error:
        status = f"not run ({error})"
    took = time.monotonic() - start
    tail = log.read_text()[-600:] if log.exists() else ""
    print(f"[{name}] {status} in {took:.0f} s", flush=True)
    if status != "ok":
        print(tail, flush=True)
    return {"stage": name, "status": status, "seconds": round(took, 1), "log": log.name}


def headline_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, list):
            rows += [r for r in data if isinstance(r, dict) and "metric" in r
                     and any(r["metric"].startswith(m) for m in HEADLINE_METRICS)]
    return rows


def write_summary_table(rows: list[dict], stages: list[dict], env: dict, readme: Path) -> None:
    lines = [f"Latest GPU run: {env['device']}, {env['date']} (torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']}). Stages: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages) + ".",
             "", "| benchmark | shape | provider | metric | median | device | date |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} ({r['mode']}) | {r['x']} | {r['provider']} | {r['metric']} | "
                     f"{r['q50']:.4g} | {r['device']} | {r['date']} |")
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    begin, end = "<!-- gpu-summary:begin -->", "<!-- gpu-summary:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Latest GPU results\n\n" + block + "\n"
    readme.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the harness only")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all stages together")
    parser.add_argument("--only", nargs="*", help="run only these stages")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    gpu = on_gpu() and not args.cpu_smoke
    if not gpu and not args.cpu_smoke:
        parser.error("no GPU here: use --cpu-smoke, or run on a GPU machine")
    out = args.out or (RESULTS / ("quick" if args.cpu_smoke else device_slug()))
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if gpu and shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    (out / "environment.json").write_text(json.dumps(env, indent=1))
    deadline = time.monotonic() + args.budget
    stages = [s for s in (GPU_STAGES if gpu else CPU_STAGES) if not args.only or s[0] in args.only]
    outcomes = [run_stage(name, command, seconds, out, deadline) for name, command, seconds in stages]
    (out / "stages.json").write_text(json.dumps(outcomes, indent=1))
    rows = headline_rows(out)
    if gpu:
        write_summary_table(rows, outcomes, env, ROOT / "benchmarks" / "README.md")
    print(f"{len(rows)} headline rows under {out}")
    return 0 if all(o["status"] == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
