"""The host path at GPU pace: the server CPU each image costs, and the share of a GPU's pace the server delivers.

    rfserve bench host [--baseline-rev REV] [--quick] [--out DIR]

The `synthetic` model stands in for the GPU: it answers real photographs after a fixed pace, sleeping with the
GIL released, so everything the server's CPU does is the host path (HTTP, batching, encoding, JSON) that a real
GPU run pays too. The load generator shares the machine, as it would in a one-box deployment.

1. Cost. With no pace (the host alone sets the speed), for each output format, size, response format and n:
   the server process's CPU time (every thread, from psutil) over a window, divided by the images answered in
   it. A `url` answer's image is fetched by the client, so its serving counts.
2. Pace. At 180 and 500 images/s (5.56 and 2 ms an image), with 16 and 64 clients asking n = 4 at the first
   size (512²), the images/s delivered as a share of the pace, for PNG and JPEG as b64_json.
3. Profile. py-spy samples the server during the 180 images/s PNG run at 16 clients, when installed; the
   report lists the Python functions holding the most samples, a C call counting as its caller's (so
   `Runner.run` is uvicorn's event loop, uvloop and httptools, and `_encode` includes pybase64).

`--baseline-rev REV` runs every part also against that commit, checked out in a git worktree, in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from rfserve.benchmarks.loadgen import CLIENT_ERRORS, environment, running, session
from rfserve.benchmarks.plots import plot_host

PACES = (180, 500)
PACE_CLIENTS = (16, 64)
COST_CLIENTS = 16
PROFILE_AT = (180, 16, "png")
_SIDE = ThreadPoolExecutor(1, thread_name_prefix="bench-profile")
# The headline figures and their targets on a 2-core CPU: 512², b64_json, 16 clients, n = 4.
TARGETS = {"png_cpu_ms": ("server CPU per PNG image, ms", "≤ 5"),
           "jpeg_cpu_ms": ("server CPU per JPEG image, ms", "≤ 3"),
           "png_share": ("share of a 180 img/s pace, PNG", "≥ 95%"),
           "jpeg_share": ("share of a 180 img/s pace, JPEG", "≥ 95%"),
           "png_1024_cpu_ms": ("1024² PNG, server CPU per image, ms", "≤ 20")}


async def load(url: str, body: dict, clients: int, seconds: float, warmup: float, pid: int) -> dict:
    """`clients` closed loops for `warmup + seconds`; images and server CPU are counted over the last `seconds`."""
    server = psutil.Process(pid)
    counted = {"images": 0, "requests": 0, "errors": 0}
    window: dict[str, float] = {}
    async with session(url, clients, 120) as client:
        async def one_client(worker: int) -> None:
            i = 0
            while "end" not in window:
                ok = False
                try:
                    async with client.post("/v1/images/generations", json={**body, "seed": worker * 10**6 + i}) as r:
                        payload = await r.read()
                        ok = r.status == 200
                    if ok and body["response_format"] == "url":
                        for item in json.loads(payload)["data"]:
                            async with client.get(item["url"]) as g:
                                await g.read()
                                ok = ok and g.status == 200
                except CLIENT_ERRORS:
                    pass
                if "start" in window and "end" not in window:
                    counted["requests"] += 1
                    counted["images"] += body["n"] if ok else 0
                    counted["errors"] += 0 if ok else 1
                i += 1

        async def clock() -> None:
            await asyncio.sleep(warmup)
            cpu = server.cpu_times()
            window["start"], window["cpu0"] = time.perf_counter(), cpu.user + cpu.system
            await asyncio.sleep(seconds)
            cpu = server.cpu_times()
            window["end"], window["cpu1"] = time.perf_counter(), cpu.user + cpu.system

        await asyncio.gather(clock(), *(one_client(w) for w in range(clients)))
    wall = window["end"] - window["start"]
    cpu_s = window["cpu1"] - window["cpu0"]
    images = counted["images"]
    return {**counted, "wall_s": round(wall, 3), "images_per_s": round(images / wall, 1),
            "server_cpu_ms_per_image": round(cpu_s * 1000 / images, 2) if images else None,
            "server_cores_busy": round(cpu_s / wall, 2)}


def synthetic_server(code: Path | None, ms_per_image: float, port: int, sizes: list[int]):
    """`rfserve serve` on the synthetic model at one pace, from this checkout or a baseline worktree."""
    model = f"synthetic?ms_per_image={ms_per_image:g}&sizes={','.join(f'{s}x{s}' for s in sizes)}"
    return running(f"--model '{model}' --max-queue 4096", port, max_batch=16, code=code)


def profile(pid: int, seconds: float, out: Path) -> list[dict] | None:
    """py-spy's samples of the server's threads, as the 15 functions holding most of them (where they run)."""
    if shutil.which("py-spy") is None:
        return None
    raw = out.with_suffix(".txt")
    done = subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                           "--format", "raw", "--output", str(raw), "--nonblocking"], capture_output=True, text=True)
    if done.returncode != 0 or not raw.exists():
        return [{"function": f"py-spy failed: {done.stderr.strip()[-200:]}", "share": 0.0}]
    leaves: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]                                   # "function (path/file.py:line)"
        name, _, where = leaf.partition(" (")
        key = f"{name} ({where.rsplit(':', 1)[0].split('site-packages/')[-1]})"
        leaves[key] = leaves.get(key, 0) + int(count)
    total = sum(leaves.values()) or 1
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:15]
    return [{"function": k, "share": round(v / total, 3)} for k, v in top]


def run_version(label: str, code: Path | None, args, out: Path) -> dict:
    seconds, warmup = (2.0, 0.5) if args.quick else (args.seconds, 1.0)
    cost, pace = [], []
    with synthetic_server(code, 0, args.port, args.sizes) as (url, proc, _):
        for fmt in ("png", "jpeg", "webp"):
            for side in args.sizes:
                for response_format in ("b64_json", "url"):
                    for n in (1, 4):
                        body = {"prompt": "p", "n": n, "size": f"{side}x{side}", "output_format": fmt,
                                "output_compression": 90, "response_format": response_format}
                        row = {"format": fmt, "size": side, "response_format": response_format, "n": n}
                        row |= asyncio.run(load(url, body, COST_CLIENTS, seconds, warmup, proc.pid))
                        cost.append(row)
                        print(label, json.dumps(row), flush=True)
    profiled = None
    for rate in PACES:
        with synthetic_server(code, 1000 / rate, args.port, args.sizes) as (url, proc, _):
            for clients in PACE_CLIENTS:
                for fmt in ("png", "jpeg"):
                    body = {"prompt": "p", "n": 4, "size": f"{args.sizes[0]}x{args.sizes[0]}", "output_format": fmt,
                            "output_compression": 90, "response_format": "b64_json"}
                    spy = None
                    if (rate, clients, fmt) == PROFILE_AT and not args.quick:
                        spy = _in_thread(profile, proc.pid, seconds, out / f"profile-{label.replace(' ', '-')}")
                    row = {"pace": rate, "clients": clients, "format": fmt}
                    row |= asyncio.run(load(url, body, clients, seconds, warmup, proc.pid))
                    row["share_of_pace"] = round(row["images_per_s"] / rate, 3)
                    pace.append(row)
                    print(label, json.dumps(row), flush=True)
                    if spy is not None:
                        profiled = spy()
    failed = [r for r in cost + pace if r["errors"]]
    if failed:                                  # a figure over failed requests measures nothing
        raise RuntimeError(f"{label}: {len(failed)} runs had failed requests, first: {failed[0]}")
    return {"cost": cost, "pace": pace, "profile": profiled}


def _in_thread(fn, *args):
    """Start `fn(*args)` beside the load; the returned callable waits for its result."""
    future = _SIDE.submit(fn, *args)
    return future.result


def headline(result: dict) -> dict:
    """The figures the targets name: 512², b64_json, 16 clients, n = 4 (1024² for the large PNG)."""
    def cost(fmt: str, side: int) -> float | None:
        rows = [r for r in result["cost"] if (r["format"], r["size"], r["response_format"], r["n"]) ==
                (fmt, side, "b64_json", 4)]
        return rows[0]["server_cpu_ms_per_image"] if rows else None

    def share(fmt: str) -> float | None:
        rows = [r for r in result["pace"] if (r["pace"], r["clients"], r["format"]) == (180, 16, fmt)]
        return rows[0]["share_of_pace"] if rows else None
    return {"png_cpu_ms": cost("png", 512), "jpeg_cpu_ms": cost("jpeg", 512), "png_1024_cpu_ms": cost("png", 1024),
            "png_share": share("png"), "jpeg_share": share("jpeg")}


def markdown(report: dict) -> str:
    env = report["env"]
    labels = list(report["versions"])
    lines = [f"Host path on {env['processor'] or env['machine']}, {env['cpus']} CPUs · torch {env['torch']} · "
             f"Python {env['python']} · {env['date']}", "",
             "| figure | target | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, (name, target) in TARGETS.items():
        cells = [report["versions"][v]["headline"][key] for v in labels]
        lines.append(f"| {name} | {target} | " + " | ".join("—" if c is None else f"{c:.0%}" if "share" in key
                                                              else f"{c:.2f}" for c in cells) + " |")
    for label in labels:
        result = report["versions"][label]
        lines += ["", f"**{label}: server CPU per image (no pace, {COST_CLIENTS} clients)**", "",
                  "| format | size | response | n | img/s | server CPU ms/image | cores busy |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['format']} | {r['size']}² | {r['response_format']} | {r['n']} | {r['images_per_s']} | "
                  f"{r['server_cpu_ms_per_image']} | {r['server_cores_busy']} |" for r in result["cost"]]
        lines += ["", f"**{label}: share of the pace delivered (512², b64_json, n = 4)**", "",
                  "| pace img/s | clients | format | img/s | share | server CPU ms/image |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['pace']} | {r['clients']} | {r['format']} | {r['images_per_s']} | "
                  f"{r['share_of_pace']:.0%} | {r['server_cpu_ms_per_image']} |" for r in result["pace"]]
        if result["profile"]:
            lines += ["", f"**{label}: where the server's CPU goes** (py-spy, {PROFILE_AT[0]} img/s, "
                      f"{PROFILE_AT[1]} clients, PNG)", "", "| share of samples | function |", "|---|---|"]
            lines += [f"| {p['share']:.1%} | `{p['function']}` |" for p in result["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rfserve bench host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", help="also measure this git commit, from a worktree, in the same run")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--seconds", type=float, default=4.0, help="measured window per figure")
    p.add_argument("--quick", action="store_true", help="short windows and no profile: a smoke run")
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/host"))
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"env": environment(), "targets": TARGETS, "versions": {}}
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "baseline"
        versions: dict[str, Path | None] = {"this checkout": None}
        if args.baseline_rev:
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline_rev], check=True,
                           capture_output=True)
            versions[f"baseline {args.baseline_rev}"] = tree
        try:
            for label, code in versions.items():
                result = run_version(label, code, args, args.out)
                result["headline"] = headline(result)
                report["versions"][label] = result
        finally:
            if args.baseline_rev:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)
    (args.out / "host.json").write_text(json.dumps(report, indent=2))
    (args.out / "host.md").write_text(markdown(report))
    plot_host(report, args.out / "host_cpu_per_image.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
