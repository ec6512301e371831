"""Continuous image batching under load (issue #33): tail latency per step class, joining on against off.

A seeded Poisson stream of one-image requests, its step class from `--mix` (equal shares, seeded order), is
replayed against an in-process Engine (`ServerConfig(continuous=...)`), once with joining on and once off, at each
`--loads` fraction of capacity; the same stream (the same gaps, in units of the mean gap, and the same classes)
serves every mode and load, so runs differ only in the rate and the mode. Both engines stay loaded and each load
level runs off then on, so drift on a shared machine touches both alike.

Definitions, all from time.monotonic in this process:
- capacity: requests/s answered with joining OFF (the baseline) when `--saturate` requests of the mix are all
  queued at once, from the first submit to the last answer; measured first, on the same engine, in the same
  run. The same burst with joining on is reported beside it (saturated throughput, on against off).
- a load level's rate: fraction × capacity; latency: answer (the future resolving) − submit;
- throughput at a level: images answered / (last answer − first submit), the drain included;
- short p99 ratio: p99 off / p99 on of the fewest-step class (target ≥ 3 at 80%); throughput ratio: on / off
  (target ≥ 1).

Models: the paced synthetic model (each step of a batch of n rows sleeps `--ms-per-batch` + n × `--ms-per-image`,
batching-friendly as a GPU is), and with `--arch tiny` (`--tiny`) or `--arch sd15` a random-weight InstaFlow at
that architecture, with `--hunyuan tiny|v1.2` a random-weight Hunyuan-DiT, or any `--model SPEC`, each at its
default size and guidance; these take `--model-mix` and `--model-requests`.

    python -m rfserve.benchmarks.bench_joining [--tiny] [--quick] [--loads 0.5,0.8,1.0] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from rfserve.benchmarks.loadgen import environment, percentile
from rfserve.benchmarks.timing import device_label, save_report
from rfserve.server.config import ServerConfig
from rfserve.server.device import resolve_device
from rfserve.server.engine import Engine

PROMPT = "a red circle on a blue background"
MODES = ("off", "on")


@dataclass(frozen=True)
class Arrival:
    at: float                 # seconds after the replay starts
    steps: int


def stream(n: int, rate: float, mix: list[int], seed: int) -> list[Arrival]:
    """`n` Poisson arrivals at `rate`/s, the classes of `mix` in equal shares (to within one) in a seeded random
    order: the seed fixes the gaps in units of the mean gap and the classes, so every rate replays the same stream
    at its own pace."""
    rng, t, out = random.Random(seed), 0.0, []
    classes = (mix * (n // len(mix) + 1))[:n]
    rng.shuffle(classes)
    for steps in classes:
        t += rng.expovariate(1.0)
        out.append(Arrival(t / rate, steps))
    return out


def stamp(times: list[float], i: int, _future: object) -> None:
    """The moment a request's future resolves, in the worker's thread as it answers."""
    times[i] = time.monotonic()


def replay(engine: Engine, model: str, arrivals: list[Arrival], timeout: float) -> dict:
    """Submit each arrival at its time (a late wake-up is caught up, not carried forward) and wait for every
    answer; latency per step class and images/s answered from the first submit to the last answer."""
    card, sent, answered = engine.cards[model], [0.0] * len(arrivals), [0.0] * len(arrivals)
    jobs, start = [], time.monotonic()
    for i, a in enumerate(arrivals):
        time.sleep(max(0.0, start + a.at - time.monotonic()))
        spec = replace(engine.default_spec(card, PROMPT, i), steps=a.steps)
        sent[i] = time.monotonic()
        job = engine.submit(model, [spec])
        job.future.add_done_callback(partial(stamp, answered, i))
        jobs.append(job)
    failed = sum(job.future.exception(timeout) is not None for job in jobs)
    late = max(s - start - a.at for s, a in zip(sent, arrivals))
    classes = {}
    for steps in sorted({a.steps for a in arrivals}):
        ms = [1000 * (answered[i] - sent[i]) for i, a in enumerate(arrivals) if a.steps == steps]
        classes[str(steps)] = {"count": len(ms), "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99),
                               "mean_ms": sum(ms) / len(ms)}
    window = max(answered) - sent[0]
    return {"requests": len(arrivals), "answered": len(arrivals) - failed, "failed": failed,
            "arrival_rate": len(arrivals) / max(sent[-1] - sent[0], 1e-9), "max_late_ms": 1000 * late,
            "window_s": window, "images_per_s": (len(arrivals) - failed) / window, "classes": classes}


def ratios(runs: dict[str, dict], short: int) -> dict:
    off, on = runs["off"], runs["on"]
    return {"short_p99": off["classes"][str(short)]["p99_ms"] / on["classes"][str(short)]["p99_ms"],
            "throughput": on["images_per_s"] / off["images_per_s"]}


def start(spec: str, mode: str, args: argparse.Namespace) -> Engine:
    """An engine as `rfserve serve` would run it, except that nothing is refused: the queue and the deadlines are
    far beyond what the stream reaches, so every request is answered and counted."""
    config = ServerConfig(models=[spec], device=args.device, warmup=True, continuous=mode == "on",
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=1_000_000,
                          request_timeout_s=args.timeout, max_request_timeout_s=args.timeout,
                          compile=args.compile)
    engine = Engine(config)
    engine.load(progress=False)
    return engine


def bench_model(spec: str, mix: list[int], requests: int, args: argparse.Namespace) -> dict:
    engines = {mode: start(spec, mode, args) for mode in MODES}
    try:
        model = next(iter(engines["off"].cards))
        burst = [Arrival(0.0, a.steps) for a in stream(args.saturate, 1.0, mix, args.seed + 1)]
        for mode in MODES:                                  # untimed: first batches of each size allocate
            replay(engines[mode], model, burst[:args.max_batch], args.timeout)
        saturated = {mode: replay(engines[mode], model, burst, args.timeout) for mode in MODES}
        capacity = saturated["off"]["answered"] / saturated["off"]["window_s"]
        levels = []
        for load in args.loads:
            arrivals = stream(requests, load * capacity, mix, args.seed)
            runs = {mode: replay(engines[mode], model, arrivals, args.timeout) for mode in MODES}
            levels.append({"load": load, "rate": load * capacity, **runs, "ratios": ratios(runs, min(mix))})
            print(f"{model} at {load:.0%}: short p99 off/on {levels[-1]['ratios']['short_p99']:.2f}x, "
                  f"throughput on/off {levels[-1]['ratios']['throughput']:.2f}x", flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return {"model": model, "spec": spec, "mix": mix, "requests": requests, "capacity_req_s": capacity,
            "saturated": {**saturated, "throughput_on_off": saturated["on"]["images_per_s"]
                          / saturated["off"]["images_per_s"]}, "levels": levels}


def default_out(device: torch.device) -> Path:
    """benchmarks/results/<device>-<date>/joining, as the committed results are filed (cpu-2core-2026-12-05)."""
    if device.type == "cuda":
        label = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        label = f"cpu-{os.cpu_count()}core"
    return Path("benchmarks/results") / f"{label}-{datetime.date.today().isoformat()}" / "joining"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]                     # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.8, 1.0],
                    help="fractions of capacity")
    ap.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                    help="run the paced synthetic model")
    ap.add_argument("--mix", type=ints, default=[1, 4, 25, 50], help="the synthetic model's step classes")
    ap.add_argument("--requests", type=int, default=200, help="arrivals per load level and mode, synthetic")
    ap.add_argument("--ms-per-batch", type=float, default=20.0, help="synthetic pace: ms a step of any batch")
    ap.add_argument("--ms-per-image", type=float, default=2.0, help="synthetic pace: ms a step per row")
    ap.add_argument("--size", default="64x64", help="the synthetic model's image size")
    ap.add_argument("--arch", choices=["tiny", "sd15"], help="also a random-weight InstaFlow of this architecture")
    ap.add_argument("--tiny", dest="arch", action="store_const", const="tiny", help="--arch tiny")
    ap.add_argument("--hunyuan", choices=["tiny", "v1.2"], help="also a random-weight Hunyuan-DiT of this preset")
    ap.add_argument("--model", action="append", default=[], metavar="SPEC", help="also this model (repeatable)")
    ap.add_argument("--model-mix", type=ints, default=[1, 4, 25], help="step classes of the models other than "
                    "synthetic")
    ap.add_argument("--model-requests", type=int, default=100, help="arrivals per load level and mode, "
                    "models other than synthetic")
    ap.add_argument("--saturate", type=int, default=96, help="requests queued at once to measure capacity")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="the batcher's wait for company (server default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                    help="default: auto on CUDA (graphs captured before ready); off on the CPU, where auto "
                    "would compile in the background during the stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a request may wait for its answer")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: few requests, fast pace")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-<date>/joining")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.model_requests, args.saturate = 16, 8, 16
        args.ms_per_batch, args.ms_per_image, args.model_mix = 2.0, 0.5, args.model_mix[:2]
    device = resolve_device(args.device)
    args.compile = args.compile or ("auto" if device.type == "cuda" else "off")
    args.out = args.out or default_out(device)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from rfserve.benchmarks.plots import plot_joining             # matplotlib: the `bench` extra

    runs = []
    if args.synthetic:
        pace = f"ms_per_batch={args.ms_per_batch:g}&ms_per_image={args.ms_per_image:g}&sizes={args.size}"
        runs.append((f"synthetic?{pace}", args.mix, args.requests))
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch:
            from rfserve.model_zoo.sd_config import save_random_sd

            folder = save_random_sd(Path(tmp) / f"instaflow-{args.arch}", args.arch, seed=0)
            runs.append((f"instaflow-2rf={folder}", args.model_mix, args.model_requests))
        if args.hunyuan:
            from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan

            folder = save_random_hunyuan(Path(tmp) / f"hunyuan-{args.hunyuan}", args.hunyuan, seed=0)
            runs.append((f"hunyuan-dit-v1.2={folder}", args.model_mix, args.model_requests))
        runs += [(spec, args.model_mix, args.model_requests) for spec in args.model]
        models = [bench_model(spec, mix, n, args) for spec, mix, n in runs]
    env = {**environment(), "device": device_label(resolve_device(args.device))}   # the threads the engines set
    config = {k: getattr(args, k) for k in ("loads", "max_batch", "max_wait_ms", "saturate", "seed", "compile",
                                            "arch", "hunyuan", "quick")}
    report = {"env": env, "config": config, "models": models}
    save_report(args.out, "bench_joining", report, markdown)
    for m in models:
        plot_joining(report, m, args.out / f"joining_{m['model']}.png")
    return report


def shown(spec: str) -> str:
    """The spec without its folder, which is a temporary directory: `instaflow-2rf`, `synthetic?ms_per_batch=20`."""
    head, sep, options = spec.partition("?")
    return head.split("=")[0] + sep + options


def markdown(r: dict) -> str:
    env = r["env"]
    lines = [f"Continuous image batching under Poisson load, {env['device']}, python {env['python']}, torch "
             f"{env['torch']}, {env['date']}; max batch {r['config']['max_batch']}, max wait "
             f"{r['config']['max_wait_ms']:g} ms, compile {r['config']['compile']}", ""]
    for m in r["models"]:
        sat = m["saturated"]
        lines += [f"**{m['model']}** (`{shown(m['spec'])}`), step mix {m['mix']} (equal shares), "
                  f"{m['requests']} requests per level and mode; capacity (joining off, {sat['off']['requests']} "
                  f"queued at once) {m['capacity_req_s']:.2f} req/s; saturated throughput on/off "
                  f"{sat['throughput_on_off']:.2f}x", "",
                  "| load | rate req/s | joining | " + " | ".join(f"{s} steps p50 / p99 ms" for s in m["mix"]) +
                  " | img/s | failed | short p99 off/on | img/s on/off |",
                  "|---" * (len(m["mix"]) + 7) + "|"]
        for lv in m["levels"]:
            for mode in MODES:
                run = lv[mode]
                cells = [f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f}" for c in (run["classes"][str(s)] for s in m["mix"])]
                tail = ([f"**{lv['ratios']['short_p99']:.2f}x**", f"**{lv['ratios']['throughput']:.2f}x**"]
                        if mode == "on" else ["", ""])
                lines.append(f"| {lv['load']:.0%} | {lv['rate']:.2f} | {mode} | " + " | ".join(cells) +
                             f" | {run['images_per_s']:.2f} | {run['failed']} | " + " | ".join(tail) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
