#!/usr/bin/env bash
# One prepared device run: GPU tests, then every benchmark with its same-run baseline, in about 8 minutes
# on an H100 (each step is capped; 560 s in all). Call it through the device tool with `carry: [".whl"]` after benchmarks/gpu/fetch_wheels.sh:
#   bash benchmarks/gpu/run.sh
# Results land in $OUT (JSON + markdown + plots); the last lines printed are the summary tables.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/rfserve-gpu}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
step() { echo "== $1"; shift; timeout "$@"; echo "   exit $?"; }
step "gpu tests" 90 python3 -m pytest -q -m gpu tests/kernels tests/server/test_buckets.py -x -p no:cacheprovider \
  2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
step "kernels" 80 python3 -m benchmarks.bench_kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
step "sd15 one-step suite" 180 python3 -m benchmarks.suite --arch sd15 --device cuda --batches 1,4,16 \
  --concurrency 1,4,16,64 --requests 64 --open-requests 200 --repeats 5 --out "$OUT" > "$OUT/suite.log" 2>&1
step "hunyuan-dit" 110 python3 -m benchmarks.bench_hunyuan --steps 50 --repeat 3 --out "$OUT" > "$OUT/hunyuan.log" 2>&1
step "janusflow" 100 python3 -m benchmarks.bench_janusflow --out "$OUT" > "$OUT/janus.log" 2>&1
for f in "$OUT"/bench_kernels.md "$OUT"/suite.md "$OUT"/bench_hunyuan.md "$OUT"/bench_janusflow.md; do
  [ -f "$f" ] && { echo "---- $(basename "$f")"; cat "$f"; }
done
