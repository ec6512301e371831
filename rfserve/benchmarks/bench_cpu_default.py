"""The CPU's default fast path, captured after ready (`--compile auto`), against `--compile off`, in one run:
seconds from start to ready for each, seconds from ready until the background capture has switched every
warm-up shape over, and request latency once it has (engine level, the model's default request).

    python -m rfserve.benchmarks.bench_cpu_default [--model rf-shapes] [--batches 1,8] [--cold] [--out DIR]

`--cold` points inductor at an empty cache first, as a first start on a new machine meets it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rfserve.benchmarks.loadgen import environment
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine


def request_ms(engine: Engine, model: str, batch: int) -> float:
    card = engine.cards[model]
    specs = [Engine.default_spec(card, "a red circle", seed) for seed in range(batch)]
    start = time.perf_counter()
    engine.submit(model, specs).future.result()
    return (time.perf_counter() - start) * 1e3


def start(model: str, compile: str, batches: list[int], threads: int | None) -> tuple[Engine, float]:
    begin = time.perf_counter()
    engine = Engine(ServerConfig(models=[model], device="cpu", max_batch=max(batches), compile=compile,
                                 batch_buckets=tuple(batches), cpu_threads=threads))
    engine.load(progress=False)
    return engine, time.perf_counter() - begin


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rf-shapes")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--cpu-threads", type=int, help="fixed torch threads (default: the engine's measured plan)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rfserve-cold-")
    batches = [int(b) for b in args.batches.split(",")]
    name = args.model.split("=")[0].split("?")[0]
    row: dict = {"model": name, "cold_cache": args.cold, "cpu_threads": args.cpu_threads}
    start(args.model, "off", batches, args.cpu_threads)[0].shutdown()      # first loads stay out of the figures
    engines = {}
    for compile in ("off", "auto"):
        engines[compile], ready_s = start(args.model, compile, batches, args.cpu_threads)
        row[f"ready_s_{compile}"] = round(ready_s, 1)
    try:
        ready = time.perf_counter()
        engines["auto"].captured_later.wait()
        row["switched_over_s_after_ready"] = round(time.perf_counter() - ready, 1)
        for b in batches:
            times: dict[str, list[float]] = {c: [] for c in engines}
            for _ in range(args.repeat + 1):                  # alternated, so that a busy host slows both alike
                for compile, engine in engines.items():
                    times[compile].append(request_ms(engine, name, b))
            for compile, t in times.items():
                row[f"ms_b{b}_{compile}"] = round(statistics.median(t[1:]), 1)     # the first settles the pools
            row[f"speedup_b{b}"] = round(row[f"ms_b{b}_off"] / row[f"ms_b{b}_auto"], 2)
    finally:
        for engine in engines.values():
            engine.shutdown()
    report = {"env": environment(), "row": row}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu_default_{'cold' if args.cold else 'warm'}" + (f"_{args.cpu_threads}t" if args.cpu_threads else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(row))
    return report


if __name__ == "__main__":
    main()
