#!/usr/bin/env bash
# Prepared device runs, each sized for one 10-minute device call (timeout_s 600), after
# benchmarks/gpu/fetch_wheels.sh, with `carry: [".whl"]`:
#   bash benchmarks/gpu/run.sh core       # GPU tests, kernels, SD1.5 one-step suite (compiled, HTTP level too)
#   bash benchmarks/gpu/run.sh hunyuan    # Hunyuan-DiT against diffusers; streaming previews and edits; chat sampling
#   bash benchmarks/gpu/run.sh janusflow  # JanusFlow against the reference loop and transformers' generate()
#   bash benchmarks/gpu/run.sh janus      # Janus-Pro against transformers
#   bash benchmarks/gpu/run.sh chat       # chat decode against the context (512 to 65,536), and 8 streams
#                                         # against generate() with a static cache (issue #32)
#   bash benchmarks/gpu/run.sh host       # the host path at GPU pace on the device machine's CPUs, and encoders
#   bash benchmarks/gpu/run.sh joining    # continuous image batching under Poisson load, joining on against off,
#                                         # on a random SD1.5-size InstaFlow (issue #33; the CPU has the synthetic)
#   bash benchmarks/gpu/run.sh lora       # 8 rows with 8 LoRA adapters in one batch against one batch per adapter
#                                         # (ours and diffusers'), fused weights and no LoRA; SD1.5 size, fp16, eager,
#                                         # and mixed against no LoRA on the captured CUDA graphs (#34)
#   bash benchmarks/gpu/run.sh dry        # every step above, on this CPU at tiny shapes: CI runs it, so that a
#                                         # device call never meets a typo, a missing flag or a missing module
# The model benchmarks time ours eagerly and then compiled, captured as the server captures it (CUDA graphs);
# each graph of a 1-1.5B model compiles in one to two minutes there, so each of those has a call of its own:
# Hunyuan-DiT compiles one graph, JanusFlow four (text to image; decode at 1, 8, 32 streams), Janus-Pro four.
# The dry run decodes one stream count and makes one batch size, to keep CI's CPU time modest.
# Results land in $OUT (JSON + markdown + plots); the last lines printed are the summary tables.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MODE="${1:-core}"
OUT="${OUT:-/tmp/rfserve-gpu}"; mkdir -p "$OUT"
FAILED=0
step() { echo "== $1"; shift; timeout "$@"; local rc=$?; echo "   exit $rc"; [ "$rc" -eq 0 ] || FAILED=1; }

if [ "$MODE" = dry ]; then
  # The same commands at tiny shapes on the CPU, Triton in its interpreter.
  export TRITON_INTERPRET=1
  DEVICE=cpu; TINY=--tiny
  SUITE="--arch tiny --device cpu --batches 1,2 --concurrency 1,2 --requests 4 --open-requests 6 --repeats 1"
  HOST="--quick --sizes 64 --seconds 1"; ENC="--sizes 64 --seconds 0.2"; HUNYUAN="--steps 2 --repeat 1"; STREAM="--repeat 1"
  SAMPLING="--rows 1,8 --repeat 1"; JANUSFLOW="--concurrency 8"; JANUS="--batches 1 --concurrency 8"
  CHAT="--contexts 512,1024 --new-tokens 8"; JOINING="--quick --arch tiny --loads 0.8"
  LORA=--dry
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
  DEVICE=cuda; TINY=
  SUITE="--arch sd15 --device cuda --batches 1,16 --concurrency 1,4,16,64 --requests 64 --open-requests 200 --repeats 5"
  HOST="--sizes 512,1024 --seconds 3"; ENC="--sizes 512,1024"; HUNYUAN="--steps 50 --repeat 3"; STREAM="--batch 8 --repeat 5"
  SAMPLING=; JANUSFLOW=; JANUS=--real; CHAT=; JOINING="--no-synthetic --arch sd15"; LORA="--rows 8 --ranks 16,64 --compiled"
fi

core() {
  step "gpu tests" 120 python3 -m pytest -q -m gpu tests/kernels tests/server/test_buckets.py \
    tests/server/test_gpu_jpeg.py tests/rf_shapes/test_guide.py -x -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
  tail -3 "$OUT/gpu_tests.txt"
  step "kernels" 80 python3 -m rfserve.benchmarks.bench_kernels --device "$DEVICE" --out "$OUT" > "$OUT/kernels.log" 2>&1
  # shellcheck disable=SC2086  # SUITE is a list of flags
  step "sd15 one-step suite" 380 python3 -m rfserve.benchmarks.suite $SUITE --server-args "--batch-buckets 1,16" \
    --out "$OUT" > "$OUT/suite.log" 2>&1
}
hunyuan() {
  # shellcheck disable=SC2086
  step "hunyuan-dit" 460 python3 -m rfserve.benchmarks.bench_hunyuan $TINY $HUNYUAN --out "$OUT" > "$OUT/hunyuan.log" 2>&1
  # shellcheck disable=SC2086
  step "previews and edits" 90 python3 -m rfserve.benchmarks.bench_streaming --device "$DEVICE" $STREAM \
    --out "$OUT/streaming" > "$OUT/streaming.log" 2>&1
  # shellcheck disable=SC2086
  step "chat sampling" 40 python3 -m rfserve.benchmarks.bench_sampling --device "$DEVICE" $SAMPLING \
    --out "$OUT/sampling" > "$OUT/sampling.log" 2>&1
}
janusflow() {
  # shellcheck disable=SC2086
  step "janusflow" 560 python3 -m rfserve.benchmarks.bench_janusflow $TINY $JANUSFLOW --out "$OUT" > "$OUT/janus.log" 2>&1
}
janus() {
  # shellcheck disable=SC2086
  step "janus-pro" 560 python3 -m rfserve.benchmarks.bench_janus $JANUS --out "$OUT" > "$OUT/janus_pro.log" 2>&1
}
chat() {
  # shellcheck disable=SC2086
  step "chat context" 560 python3 -m rfserve.benchmarks.bench_chat_context $TINY $CHAT --out "$OUT" > "$OUT/chat.log" 2>&1
}
host() {
  # shellcheck disable=SC2086
  step "host path" 420 python3 -m rfserve.benchmarks.bench_host $HOST --out "$OUT/host" > "$OUT/host.log" 2>&1
  # shellcheck disable=SC2086
  step "encoders" 120 python3 -m rfserve.benchmarks.bench_encoders $ENC --out "$OUT/encoders.json" > "$OUT/encoders.log" 2>&1
}
joining() {
  # shellcheck disable=SC2086
  step "joining" 560 python3 -m rfserve.benchmarks.bench_joining --device "$DEVICE" $JOINING --out "$OUT/joining" \
    > "$OUT/joining.log" 2>&1
}
lora() {
  # shellcheck disable=SC2086
  step "lora" 560 python3 -m rfserve.benchmarks.bench_lora --device "$DEVICE" $LORA --out "$OUT/lora" > "$OUT/lora.log" 2>&1
}

case "$MODE" in
  core) core; reports="bench_kernels.md suite.md" ;;
  hunyuan) hunyuan; reports="bench_hunyuan.md streaming/streaming.md sampling/sampling.md" ;;
  janusflow) janusflow; reports="bench_janusflow.md" ;;
  janus) janus; reports="bench_janus_janus-pro-1b.md" ;;
  chat) chat; reports="bench_chat_context.md" ;;
  host) host; reports="host/host.md" ;;
  joining) joining; reports="joining/bench_joining.md" ;;
  lora) lora; reports="lora/bench_lora.md" ;;
  dry) core; hunyuan; janusflow; janus; chat; host; joining; lora; reports="" ;;
  *) echo "usage: run.sh core|hunyuan|janusflow|janus|chat|host|joining|lora|dry" >&2; exit 2 ;;
esac
for f in $reports; do [ -f "$OUT/$f" ] && { echo "---- $f"; cat "$OUT/$f"; }; done
if [ "$MODE" = dry ] && [ "$FAILED" -ne 0 ]; then
  for f in "$OUT"/*.log "$OUT"/gpu_tests.txt; do echo "---- $f"; tail -15 "$f"; done
  exit 1
fi
exit 0
