#!/usr/bin/env bash
# The one command for a GPU machine with no network (see benchmarks/README.md):
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: wheels the GPU image lacks, into .whl/
#   device run(carry=[".whl"], command="bash benchmarks/gpu_run.sh")
# Installs the carried wheels and this checkout without touching the image's torch and
# triton, then runs the training profile (benchmarks/profile_e2e.py --train: the MILD train
# step against the naive one, SDXL 1024², two people) and benchmarks/run_all.py (build
# csrc, GPU tests, every benchmark, the end-to-end profile) inside one 10-minute call.
# Results land in benchmarks/results/<gpu>/ and, when the device tool's $OUT is set, a
# copy of the summary files goes there too. Arguments go to run_all (e.g. --only STAGE).
#
# Time: the call allows 600 s. BUDGET (540 s) covers the training profile and run_all; the
# other 60 s are the install, the imports and the tar at the end. The training profile runs
# first, cut at TRAIN_BUDGET (180 s; 0 skips it), and run_all gets the rest of BUDGET for
# its stages (its own time limits, in its order of value). Expected: per SDXL case, two
# UNet builds (~10 s each), the first MILD step compiling SMA and LoRA forward and backward
# (~60 s cold), then 2 warm-up, 4 timed and 1 profiled step per provider (~1-2 s each):
# ~110 s. The cases run sdxl fp32 weights (as mild train), sdxl bf16 weights, then sd15;
# the cut drops those that do not fit, and every finished case's rows are already written.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
results="benchmarks/results/$(python3 -c 'from benchmarks.common import device_slug; print(device_slug())')"
mkdir -p "$results"

budget=${BUDGET:-540}
train_budget=${TRAIN_BUDGET:-180}
train_log="$results/log_train-profile.txt"
started=$SECONDS
train_status=0
if [ "$train_budget" -gt 0 ]; then
  timeout "$train_budget" python3 benchmarks/profile_e2e.py --train --arch sdxl sd15 --train-weights fp32 bf16 \
    --out "$results" 2>&1 | tee "$train_log"
  train_status=${PIPESTATUS[0]}
  if [ "$train_status" -eq 124 ]; then
    echo "[train-profile] cut at ${train_budget} s; the cases it finished are in $results/e2e_train.json"
  fi
fi
# run_all's summary table reads every result file in $results, the training speedup included
python3 -m benchmarks.run_all --budget "$(( budget - (SECONDS - started) ))" "$@"
status=$?

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" "$results" benchmarks/README.md
  cp "$results"/stages.json "$results"/environment.json "$results"/e2e_train.json "$OUT"/ 2>/dev/null
fi
# The training target's ratio again, where the end of the output shows it
grep -h "the naive-train samples/s" "$train_log" 2>/dev/null
# A training profile cut by its time limit is not a failure: the cases it finished count.
if [ "$status" -eq 0 ] && [ "$train_status" -ne 0 ] && [ "$train_status" -ne 124 ]; then
  status=$train_status
fi
exit $status
