#!/usr/bin/env bash
# Regenerates constraints.txt: every package of every extra, resolved by uv for Python 3.11 and later on
# any platform (the Docker image runs Ubuntu's 3.12), with torch held at the version the README installs.
# The tests pass with exactly this set; .ci/run installs with it, and .ci/upstream.sh tests the newest and
# the oldest allowed releases beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=2.13.0   # the CPU build lies on the CI machine's disk; the README, .ci/ and the Dockerfile name it too
uv pip compile pyproject.toml --universal --python-version 3.11 --all-extras --upgrade \
  --constraint <(echo "torch==$torch") --custom-compile-command "bash .ci/lock.sh" --no-emit-package rfserve \
  -o constraints.txt
