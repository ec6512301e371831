#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks (it has torch, triton, transformers, numpy, pillow, ...),
# into .whl/ for a device run (Python 3.12, x86-64). Run from the repo root; .whl/ must be git-ignored.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
fetch "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')"
fetch fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
      sniffio anyio h11 openai distro jiter
fetch fpng simplejpeg pybase64 py-spy          # the encoders server/encoding.py imports; the host profile
ls -1 .whl
