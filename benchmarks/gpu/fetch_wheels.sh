#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks (it has torch, triton, numpy, pillow, ...), into .whl/ for a
# device run (Python 3.12, x86-64), then check that they resolve with the image (check_wheels.py). Each is
# carried at constraints.txt's version, which the tests ran against (the image's transformers is older). Run
# from the repo root; .whl/ is git-ignored, so the device tool carries it only when named.
set -euo pipefail
mkdir -p .whl
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
# Each at constraints.txt's version for the image's platform; one the constraints lack is not needed.
pinned() {
  for pin in $(python3 benchmarks/gpu/check_wheels.py --pin "$@"); do
    fetch "$pin"
  done
}
pinned diffusers transformers fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
       sniffio anyio h11 openai python-multipart
pinned fpng simplejpeg pybase64 py-spy          # the encoders server/encoding.py imports; the host profile
# Then whatever those need that the image lacks, until nothing is missing.
for _ in 1 2 3 4 5; do
  missing=$(python3 benchmarks/gpu/check_wheels.py --missing .whl)
  [ -n "$missing" ] || break
  # shellcheck disable=SC2086  # one name per word
  pinned $missing
done
ls -1 .whl
python3 benchmarks/gpu/check_wheels.py .whl
