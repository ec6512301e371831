"""The latency suite behind `rfserve bench`: model-level (ours next to plain diffusers on
the same weights, per stage) and HTTP-level (closed loop over concurrencies, open loop with
Poisson arrivals, time to first image). Writes suite.json, suite.md and PNG plots.

    rfserve bench --model rf-shapes --out benchmarks/out
    rfserve bench --arch sd15 --device cuda --batches 1,4,16,64      # random weights, real config
    rfserve bench host --baseline-rev REV       # the host path at GPU pace (benchmarks/bench_host.py)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import tempfile
import time
from pathlib import Path

import httpx
import torch

from rfserve.benchmarks.bench_host import main as bench_host
from rfserve.benchmarks.bench_models import bench
from rfserve.benchmarks.loadgen import closed_loop, environment, open_loop, spawn
from rfserve.benchmarks.plots import plot_latency, plot_throughput
from rfserve.benchmarks.report import markdown
from rfserve.model_zoo.registry import resolve_dtype
from rfserve.model_zoo.sd_config import save_random_sd


def time_to_first_image(server_args: str, port: int, body: dict, timeout: float = 600) -> tuple[float, object]:
    """Seconds from process start to the first 200 from the images route."""
    start = time.monotonic()
    proc = spawn(server_args, port, 8)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 200:
                return time.monotonic() - start, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("no image before the timeout")


def http_level(server_args: str, port: int, body: dict, levels: list[int], requests: int,
               open_rate: float | None, open_requests: int) -> dict:
    ttfi, proc = time_to_first_image(server_args, port, body)
    url = f"http://127.0.0.1:{port}"
    try:
        closed = [asyncio.run(closed_loop(url, body, c, max(requests, 2 * c), 300)) for c in levels]
        saturation = max(r["images_per_s"] for r in closed)
        rate = open_rate or 0.8 * saturation / body.get("n", 1)
        opened = asyncio.run(open_loop(url, body, rate, open_requests))
    finally:
        proc.terminate()
        proc.wait(60)
    return {"time_to_first_image_s": ttfi, "closed_loop": closed, "open_loop": opened,
            "saturation_img_s": saturation}


def main(argv: list[str] | None = None) -> dict:
    if argv and argv[0] == "host":
        return bench_host(argv[1:])
    p = argparse.ArgumentParser(prog="rfserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="SPEC as for serve (default rf-shapes; see --arch)")
    p.add_argument("--arch", choices=["sd15", "tiny"], help="random weights in this SD1.5-layout config")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--sizes", default=None, help="comma-separated WxH (default: the model's default size)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--requests", type=int, default=64, help="requests per closed-loop level (≥ 2× level)")
    p.add_argument("--open-rate", type=float, default=None, help="req/s (default: 80%% of saturation)")
    p.add_argument("--open-requests", type=int, default=200)
    p.add_argument("--port", type=int, default=8777)
    p.add_argument("--server-args", default="", help="extra `rfserve serve` flags for the HTTP level")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = resolve_dtype(args.dtype, device)
    report: dict = {"env": environment(), "args": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as scratch:
        spec = args.model
        if spec is None and args.arch:
            spec = f"instaflow-0.9b={save_random_sd(Path(scratch) / 'random', args.arch)}"
        spec = spec or "rf-shapes"
        report["model"] = spec
        if not args.skip_model:
            report["model_level"] = bench(spec, arch=args.arch or "tiny", batches=_ints(args.batches),
                                          sizes=args.sizes.split(",") if args.sizes else None, steps=args.steps,
                                          device=str(device), dtype=dtype, repeats=args.repeats,
                                          compile_mode=args.compile_mode)
        if not args.skip_http:
            body = {"prompt": "two red circles on a blue background", "model": spec.split("=")[0]}
            body |= {"num_inference_steps": args.steps} if args.steps else {}
            server_args = f"--model {shlex.quote(spec)} --device {device.type} --max-queue 4096 {args.server_args}"
            report["http"] = http_level(server_args, args.port, body, _ints(args.concurrency), args.requests,
                                        args.open_rate, args.open_requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(report, indent=2))
    (args.out / "suite.md").write_text(markdown(report))
    if "model_level" in report:
        plot_throughput(report, args.out / "throughput_vs_batch.png")
    if "http" in report:
        plot_latency(report, args.out / "latency_vs_concurrency.png")
    print(markdown(report))
    return report


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    main()
