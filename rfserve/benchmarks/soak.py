"""Soak: open-loop Poisson load at a multiple of measured capacity, with random client
disconnects. Every request must end in 200, 429 or 503 (or be one we aborted ourselves);
no other status, no lost request, and bounded RSS growth on the server.

    python -m rfserve.benchmarks.soak --spawn "--model rf-shapes" --requests 10000 --overload 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import psutil

from rfserve.benchmarks.loadgen import closed_loop, environment, open_loop, spawn, wait_ready

ALLOWED = {200, 429, 503}


def run(url: str, pid: int, body: dict, requests: int, overload: float, disconnect: float, seed: int) -> dict:
    capacity = asyncio.run(closed_loop(url, body, 16, 160, 120))["images_per_s"]
    server = psutil.Process(pid)
    rss: list[int] = []
    done = 0

    def on_done():
        nonlocal done
        done += 1
        if done % max(1, requests // 10) == 0:
            rss.append(server.memory_info().rss)

    result = asyncio.run(open_loop(url, body, capacity * overload, requests, disconnect=disconnect, seed=seed,
                                   on_done=on_done))
    other = {k: v for k, v in result["statuses"].items() if int(k) not in ALLOWED}
    answered = sum(result["statuses"].values())
    growth = (rss[-1] - rss[0]) / rss[0] if len(rss) >= 2 else 0.0
    return {**result, "capacity_img_s": capacity, "requests": requests, "answered": answered,
            "other_status": other, "rss_mb": [r / 2**20 for r in rss], "rss_growth": growth,
            "ok": not other and result["lost"] == 0 and answered + result["aborted"] == requests}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spawn", required=True, metavar="SERVER_ARGS")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--overload", type=float, default=4.0, help="offered load as a multiple of capacity")
    p.add_argument("--disconnect", type=float, default=0.05, help="fraction of clients that leave early")
    p.add_argument("--prompt", default="three blue squares on a yellow background")
    p.add_argument("--model", default=None)
    p.add_argument("--size", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    body = {"prompt": args.prompt} | {k: v for k, v in {"model": args.model, "size": args.size}.items() if v}
    proc = spawn(args.spawn + " --max-queue 64 --request-timeout 30", args.port, 8)
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, proc)
        report = run(url, proc.pid, body, args.requests, args.overload, args.disconnect, args.seed)
    finally:
        proc.terminate()
        report_exit = proc.wait(60)
    report |= {"server_exit_code": report_exit, "env": environment(), "body": body}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ok", "requests", "answered", "aborted", "lost", "statuses",
                                             "capacity_img_s", "arrival_rate", "achieved_rate", "rss_growth",
                                             "wall_s")}, indent=1))
    return report


if __name__ == "__main__":
    main()
