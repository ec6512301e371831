#!/usr/bin/env bash
# The README's first command as a new user runs it: a fresh venv with only the base install.
# Every module imports, `rfserve serve` reaches /ready on the embedded model, its printed curl line
# writes a PNG, one /v1/images/generations answers a PNG, and `rfserve generate` writes one.
# `fresh_install.sh newest` installs without constraints.txt: what an unpinned install resolves to today.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(-c constraints.txt)
[ "${1:-}" != newest ] || pins=()
work=$(mktemp -d)
venv="$work/venv"
python -m venv "$venv"
"$venv/bin/pip" install -q "torch==$(sed -n 's/^torch==//p' constraints.txt)" "${pins[@]}" -e .
"$venv/bin/rfserve" --version
"$venv/bin/python" .ci/import_all.py
# A command that needs an extra says which, in one line.
bench=$("$venv/bin/rfserve" bench --help 2>&1 || true)
grep -q "^rfserve: error: rfserve bench needs the bench extra" <<<"$bench" && ! grep -q Traceback <<<"$bench" \
  || { echo "$bench"; echo "fresh install: rfserve bench without its extra must say so in one line"; exit 1; }

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log="$work/serve.log"
"$venv/bin/rfserve" serve --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; echo "fresh install: rfserve serve exited"; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { tail -50 "$log"; echo "fresh install: never ready"; exit 1; }

is_png() {  # FILE: a PNG that decodes, 64x64 as rf-shapes makes them
  "$venv/bin/python" -c 'import sys; from PIL import Image; im = Image.open(sys.argv[1]); im.load()
assert im.format == "PNG" and im.size == (64, 64), (im.format, im.size)' "$1"
}

# The banner's curl line, run exactly as printed (it saves out.png in the working folder).
for _ in $(seq 50); do grep -q "try it:" "$log" && break; sleep 0.1; done
line=$(grep "try it:" "$log" | sed 's/^ *try it: *//')
[ -n "$line" ] || { cat "$log"; echo "fresh install: no curl line printed"; exit 1; }
grep -q "playground: http://127.0.0.1:$port/" "$log" || { cat "$log"; echo "fresh install: no playground URL"; exit 1; }
(cd "$work" && PATH="$venv/bin:$PATH" bash -c "$line") && is_png "$work/out.png"

curl -sf "http://127.0.0.1:$port/v1/images/generations" -H 'content-type: application/json' \
  -d '{"prompt": "two red circles on a blue background", "seed": 4}' -o "$work/answer.json"
"$venv/bin/python" -c 'import base64, json, sys
open(sys.argv[2], "wb").write(base64.b64decode(json.load(open(sys.argv[1]))["data"][0]["b64_json"]))' \
  "$work/answer.json" "$work/served.png"
is_png "$work/served.png"

kill -TERM "$server"
wait "$server" || { tail -20 "$log"; echo "fresh install: serve did not exit 0 on SIGTERM"; exit 1; }

"$venv/bin/rfserve" generate "a red circle on a blue background" -o "$work/generated.png" --seed 1
is_png "$work/generated.png"
echo "fresh install${1:+ ($1)}: serve, its curl line, one generation and rfserve generate all gave PNGs"
