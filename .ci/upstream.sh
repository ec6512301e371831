#!/usr/bin/env bash
# The fast subset on releases other than constraints.txt's, so that an upstream release that breaks us
# fails here, named, rather than at a user's install:
#   newest  every dependency at its newest release (torch stays at the README's version: the only build
#           this machine's CPU index has; newer torch wheels are CUDA builds of several GB)
#   oldest  every declared lower bound in pyproject.toml, resolved by uv's lowest-direct resolution
# Run: bash .ci/upstream.sh newest|oldest. The subset is pytest's `smoke` marker: every module imports,
# rfserve serve answers an image, and tiny JanusFlow and Janus-Pro checkpoints load, chat (streamed) and
# match their references.
set -euo pipefail
mode=${1:?newest or oldest}
cd "$(dirname "$0")/.."
torch=$(sed -n 's/^torch==//p' constraints.txt)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "torch==$torch" uv
case "$mode" in
  newest) "$py" -m pip install -q --upgrade-strategy eager -e '.[dev]' ;;
  oldest) "$py" -m uv pip install -q --python "$py" --resolution lowest-direct \
            --constraint <(echo "torch==$torch") -e '.[dev]' ;;
  *) echo "upstream.sh: newest or oldest, not $mode"; exit 2 ;;
esac
echo "upstream ($mode): $("$py" -m pip list 2>/dev/null \
  | awk 'tolower($1) ~ /^(torch|transformers|diffusers|huggingface.hub|accelerate|tokenizers|kernels|fastapi|pydantic|numpy)$/ {printf "%s %s, ", $1, $2}')"
"$py" .ci/import_all.py
"$py" -m pytest -q -m smoke -p no:cacheprovider || { echo "upstream ($mode): the smoke subset failed on these releases"; exit 1; }
