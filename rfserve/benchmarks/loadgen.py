"""HTTP load generator for the Images API: closed loop at fixed concurrencies.

    python -m rfserve.benchmarks.loadgen --url http://127.0.0.1:8000 --model rf-shapes
    python -m rfserve.benchmarks.loadgen --spawn "--model rf-shapes" --compare-max-batch 8

`--spawn` starts the server itself (on 127.0.0.1); with `--compare-max-batch B` it runs the
same load twice, against `--max-batch B` and `--max-batch 1`, and reports the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import aiohttp
import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def session(url: str, connections: int, timeout: float) -> aiohttp.ClientSession:
    """aiohttp rather than httpx: it spends about a fifth of the CPU per request, and the load generator
    shares the machine with the server it measures."""
    return aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=connections))


async def post_image(client: aiohttp.ClientSession, body: dict) -> int:
    async with client.post("/v1/images/generations", json=body) as r:
        await r.read()
        return r.status


async def closed_loop(url: str, body: dict, concurrency: int, requests: int, timeout: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one returns."""
    latencies, statuses, images = [], {}, 0
    remaining = requests
    async with session(url, concurrency, timeout) as client:
        async def client_loop(worker: int):
            nonlocal remaining, images
            i = 0
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                try:
                    code = await post_image(client, {**body, "seed": worker * 100_000 + i})
                except CLIENT_ERRORS:
                    code = 0
                latencies.append(time.perf_counter() - start)
                statuses[code] = statuses.get(code, 0) + 1
                images += body.get("n", 1) if code == 200 else 0
                i += 1

        wall = time.perf_counter()
        await asyncio.gather(*(client_loop(w) for w in range(concurrency)))
        wall = time.perf_counter() - wall
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "requests": requests, "ok": ok, "errors": requests - ok,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": wall,
            "images_per_s": images / wall, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p90_ms": percentile(latencies, 0.9) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000}


async def open_loop(url: str, body: dict, rate: float, requests: int, *, disconnect: float = 0.0,
                    seed: int = 0, timeout: float = 120, on_done=lambda: None) -> dict:
    """Poisson arrivals at `rate`/s regardless of completions; a `disconnect` fraction of
    clients leave after a short random wait."""
    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    aborted = lost = images = 0
    errors: dict[str, int] = {}
    async with session(url, 1024, timeout) as client:
        async def one(i: int):
            nonlocal aborted, lost, images
            start = time.perf_counter()
            call = asyncio.ensure_future(post_image(client, {**body, "seed": i}))
            try:
                if rng.random() < disconnect:
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    if not call.done():
                        call.cancel()                     # the client goes away mid-request
                        aborted += 1
                        return
                code = await call
                statuses[str(code)] = statuses.get(str(code), 0) + 1
                if code == 200:
                    latencies.append(time.perf_counter() - start)
                    images += body.get("n", 1)
            except asyncio.CancelledError:
                aborted += 1
            except CLIENT_ERRORS as err:
                lost += 1
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            finally:
                on_done()

        tasks, wall = [], time.perf_counter()
        due = wall
        for i in range(requests):
            tasks.append(asyncio.ensure_future(one(i)))
            # Arrival times are fixed in advance, so a late wake-up is caught up, not carried forward.
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sending = time.perf_counter() - wall
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - wall
    # arrival_rate: what the server was actually offered; achieved_rate also counts the tail of answers.
    return {"offered_rate": rate, "arrival_rate": requests / sending, "achieved_rate": requests / wall,
            "requests": requests, "wall_s": wall,
            "statuses": statuses, "aborted": aborted, "lost": lost, "lost_by_error": errors,
            "images_per_s": images / wall,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p90_ms": percentile(latencies, 0.9) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def spawn(server_args: str, port: int, max_batch: int, code: Path | None = None) -> subprocess.Popen:
    """`rfserve serve` from this installation, or from the source tree `code` (another commit's worktree):
    `python -m` puts its working directory first on the path, ahead of the installed packages."""
    cmd = [sys.executable, "-m", "rfserve.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning",
           *shlex.split(server_args)]
    return subprocess.Popen(cmd, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def running(server_args: str, port: int, max_batch: int, code: Path | None = None
            ) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """A spawned server, once ready: its URL, its process and the seconds it took to be ready; stopped on exit."""
    proc = spawn(server_args, port, max_batch, code)
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, proc, wait_ready(url, proc)
    finally:
        proc.terminate()
        proc.wait(30)


def run_levels(url: str, body: dict, levels: list[int], requests: int, timeout: float) -> list[dict]:
    asyncio.run(closed_loop(url, body, 2, 4, timeout))          # warm connections and caches
    return [asyncio.run(closed_loop(url, body, c, max(requests, 2 * c), timeout)) for c in levels]


def naive_loop(spec: str, body: dict, requests: int) -> dict:
    """The hand-rolled baseline: load the pipeline and answer one request at a time,
    PNG-encoding each image, with no server and no batching."""
    import torch

    from rfserve.model_zoo.base import ImageSpec, parse_size
    from rfserve.model_zoo.registry import load_model, parse_spec
    from rfserve.server.encoding import image_bytes

    model = load_model(parse_spec(spec), torch.device("cpu"), torch.float32)
    d = model.card.defaults
    w, h = parse_size(body.get("size") or d.size)
    steps = body.get("num_inference_steps") or d.steps

    def one(i: int):
        spec_i = ImageSpec(f"{body['prompt']} {i}", d.negative_prompt, i, w, h, steps, d.guidance)
        image_bytes(model.pipeline.run([spec_i]).images[0])

    one(-1)
    start = time.perf_counter()
    for i in range(requests):
        one(i)
    wall = time.perf_counter() - start
    return {"requests": requests, "wall_s": wall, "images_per_s": requests / wall}


def environment() -> dict:
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def markdown(runs: dict[str, list[dict]]) -> str:
    lines = ["| server | concurrency | ok | errors | img/s | p50 ms | p90 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        for r in rows:
            lines.append(f"| {label} | {r['concurrency']} | {r['ok']} | {r['errors']} | {r['images_per_s']:.2f} | "
                         f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server")
    p.add_argument("--spawn", metavar="SERVER_ARGS", help='start `rfserve serve SERVER_ARGS` on 127.0.0.1')
    p.add_argument("--compare-max-batch", type=int, metavar="B", help="with --spawn: --max-batch B vs 1")
    p.add_argument("--compare-naive", metavar="SPEC", help="also time a one-request-at-a-time loop over SPEC")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="two red circles on a blue background")
    p.add_argument("--size", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least 2×level)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("give exactly one of --url and --spawn")
    body = {"prompt": args.prompt, "response_format": "b64_json"}
    body |= {k: v for k, v in {"model": args.model, "size": args.size, "num_inference_steps": args.steps}.items() if v}
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[str, list[dict]] = {}
    startup: dict[str, float] = {}
    if args.url:
        runs["server"] = run_levels(args.url, body, levels, args.requests, args.timeout)
    else:
        batches = [args.compare_max_batch, 1] if args.compare_max_batch else [None]
        for b in batches:
            label = f"max-batch {b}" if b else "server"
            with running(args.spawn, args.port, b or 8) as (url, _, startup[label]):
                runs[label] = run_levels(url, body, levels, args.requests, args.timeout)
    report = {"env": environment(), "body": body, "startup_to_ready_s": startup, "runs": runs}
    if args.compare_max_batch:
        batched, single = runs[f"max-batch {args.compare_max_batch}"], runs["max-batch 1"]
        report["throughput_ratio"] = {str(b["concurrency"]): b["images_per_s"] / s["images_per_s"]
                                      for b, s in zip(batched, single)}
    table = markdown(runs)
    if args.compare_naive:
        report["naive"] = naive_loop(args.compare_naive, body, args.requests)
        first = next(iter(runs.values()))
        report["ratio_vs_naive"] = {str(r["concurrency"]): r["images_per_s"] / report["naive"]["images_per_s"]
                                    for r in first}
        table += (f"\n\nNaive loop (one request at a time, in-process): {report['naive']['images_per_s']:.2f} img/s; "
                  "server / naive: " + ", ".join(f"c={c}: {r:.2f}×" for c, r in report["ratio_vs_naive"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadgen.json").write_text(json.dumps(report, indent=2))
    if "throughput_ratio" in report:
        table += "\n\nThroughput ratio, batched / max-batch 1: " + ", ".join(
            f"c={c}: {r:.2f}×" for c, r in report["throughput_ratio"].items())
    (args.out / "loadgen.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
