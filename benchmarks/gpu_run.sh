#!/usr/bin/env bash
# The one command for a GPU machine with no network (see benchmarks/README.md):
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: wheels the GPU image lacks, into .whl/
#   device run(carry=[".whl"], command="bash benchmarks/gpu_run.sh")
# Installs the carried wheels and this checkout without touching the image's torch and
# triton, then runs benchmarks/run_all.py (build csrc, GPU tests, every benchmark, the
# end-to-end profile) inside one 10-minute call. Results land in benchmarks/results/<gpu>/
# and, when the device tool's $OUT is set, a copy of the summary files goes there too.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m benchmarks.run_all --budget "${BUDGET:-540}" "$@"
status=$?
if [ -n "${OUT:-}" ]; then
  results=$(ls -d benchmarks/results/gpu-* 2>/dev/null | head -1)
  if [ -n "$results" ]; then
    tar czf "$OUT/results.tgz" "$results" benchmarks/README.md
    cp "$results"/stages.json "$results"/environment.json "$OUT"/ 2>/dev/null
  fi
fi
exit $status
