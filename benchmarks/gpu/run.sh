#!/usr/bin/env bash
# Prepared device runs, each sized for one 10-minute device call (timeout_s 600), after
# benchmarks/gpu/fetch_wheels.sh, with `carry: [".whl"]`:
#   bash benchmarks/gpu/run.sh core     # GPU tests, kernels, SD1.5 one-step suite (compiled, HTTP level too)
#   bash benchmarks/gpu/run.sh models   # Hunyuan-DiT and JanusFlow against their same-run baselines
# Results land in $OUT (JSON + markdown + plots); the last lines printed are the summary tables.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/rfserve-gpu}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
step() { echo "== $1"; shift; timeout "$@"; echo "   exit $?"; }
case "${1:-core}" in
  core)
    step "gpu tests" 90 python3 -m pytest -q -m gpu tests/kernels tests/server/test_buckets.py -x -p no:cacheprovider \
      > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt"
    step "kernels" 80 python3 -m benchmarks.bench_kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
    step "sd15 one-step suite" 380 python3 -m benchmarks.suite --arch sd15 --device cuda --batches 1,16 \
      --concurrency 1,4,16,64 --requests 64 --open-requests 200 --repeats 5 --server-args "--batch-buckets 1,16" \
      --out "$OUT" > "$OUT/suite.log" 2>&1
    reports="bench_kernels.md suite.md" ;;
  models)
    step "hunyuan-dit" 280 python3 -m benchmarks.bench_hunyuan --steps 50 --repeat 3 --out "$OUT" > "$OUT/hunyuan.log" 2>&1
    step "janusflow" 260 python3 -m benchmarks.bench_janusflow --out "$OUT" > "$OUT/janus.log" 2>&1
    reports="bench_hunyuan.md bench_janusflow.md" ;;
esac
for f in $reports; do [ -f "$OUT/$f" ] && { echo "---- $f"; cat "$OUT/$f"; }; done
