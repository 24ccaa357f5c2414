#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks (it has torch 2.11,
# triton 3.6, transformers, safetensors and numpy for Python 3.12, and no network) into .whl/,
# which the device tool carries: run(carry=[".whl"], command="bash benchmarks/gpu_run.sh").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  diffusers==0.42.1 pytest pluggy iniconfig hypothesis sortedcontainers pytest-benchmark py-cpuinfo \
  matplotlib contourpy cycler fonttools kiwisolver pyparsing
ls -la .whl
