"""Chat and images on one device: inter-token gaps of chat streams and text-to-image throughput, each
alone and together, with the engine's shared device turns against uncoordinated threads (the code
before turns: the image worker and the chat batcher each ran whenever they liked), in the same run.

A tiny random JanusFlow checkpoint on the CPU by default; `--device cuda` for a real one with `--model`.

    python -m rfserve.benchmarks.bench_one_device [--streams 8] [--steps 30] [--seconds 10] [--out benchmarks/out/]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from rfserve.model_zoo.janusflow.processor import SYSTEM_PROMPT, USER, sft_prompt
from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher, TokenMetrics
from rfserve.server.config import ServerConfig
from rfserve.server.device import DeviceTurns
from rfserve.server.engine import Engine

MODEL = "janusflow-1.3b"
QUESTION = "describe a quiet harbour at dawn, then write a short poem about the sea"


class Samples(list):
    """Stands in for a Prometheus histogram or counter, keeping what it is given."""

    def observe(self, value: float) -> None:
        self.append(value)

    def inc(self, amount: float = 1) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def chat_streams(engine: Engine, turns: DeviceTurns, streams: int, seconds: float) -> dict:
    """`streams` greedy streams, each restarted when it ends, for `seconds`; EOS never ends one early."""
    parts = engine.chat_parts(MODEL)
    ids, positions = parts.processor.chat_ids(sft_prompt([(USER, QUESTION)], SYSTEM_PROMPT))
    budget = min(engine.chat_max_len(MODEL) - len(ids) - 1, 200)
    gaps = Samples()
    batcher = ContinuousBatcher(parts.decoder(streams, engine.chat_max_len(MODEL)), parts.tokenizer, eos_id=-1,
                                metrics=TokenMetrics(Samples(), gaps, Samples(), Samples()), turns=turns).start()
    stop = time.monotonic() + seconds
    done = threading.Semaphore(0)

    def submit():
        batcher.submit(ChatSequence(ids, None, positions, budget, 0.0, 1.0, [], None, emit))

    def emit(event):
        if event.finish_reason:
            done.release()

    for _ in range(streams):
        submit()
    while time.monotonic() < stop:
        if done.acquire(timeout=0.1) and time.monotonic() < stop:
            submit()
    batcher.close()
    return {"tokens": len(gaps), "gap_p50_ms": 1000 * statistics.median(gaps),
            "gap_p99_ms": 1000 * percentile(gaps, 0.99), "gap_max_ms": 1000 * max(gaps)}


def images(engine: Engine, steps: int, stop: threading.Event, out: dict) -> None:
    """One 1-image job after another until `stop`; images per second."""
    card = engine.cards[MODEL]
    spec = replace(engine.default_spec(card, "a red fox in the snow", 0), steps=steps)
    start, count = time.monotonic(), 0
    while not stop.is_set():
        engine.submit(MODEL, [replace(spec, seed=count)]).future.result()
        count += 1
    out["images_per_s"] = count / (time.monotonic() - start)
    out["images"] = count


def run(engine: Engine, shared: bool, streams: int, steps: int, seconds: float) -> dict:
    chat_turns = engine.turns if shared else DeviceTurns()     # uncoordinated: the chat thread ignores the worker
    row: dict = {"turns": "shared" if shared else "uncoordinated"}
    row["chat_alone"] = chat_streams(engine, chat_turns, streams, seconds)
    alone: dict = {}
    stop = threading.Event()
    worker = threading.Thread(target=images, args=(engine, steps, stop, alone))
    worker.start()
    time.sleep(seconds)
    stop.set()
    worker.join()
    row["images_alone"] = alone
    together: dict = {}
    stop = threading.Event()
    worker = threading.Thread(target=images, args=(engine, steps, stop, together))
    worker.start()
    row["chat_with_images"] = chat_streams(engine, chat_turns, streams, seconds)
    stop.set()
    worker.join()
    row["images_with_chat"] = together
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SPEC of a JanusFlow checkpoint (default: a tiny random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model
        if spec is None:
            from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint

            spec = f"{MODEL}={save_random_checkpoint(Path(tmp), 'tiny', seed=0)}"
        engine = Engine(ServerConfig(models=[spec], device=args.device, warmup=False, max_batch=1))
        engine.load(progress=False)
        try:
            rows = []
            for shared in (False, True):
                # The baseline's image worker must not share the chat's turns either.
                engine.worker.turns = engine.turns if shared else DeviceTurns()
                rows.append(run(engine, shared, args.streams, args.steps, args.seconds))
        finally:
            engine.shutdown()
    result = {"date": datetime.date.today().isoformat(), "device": args.device, "cpu": platform.processor(),
              "torch": torch.__version__, "streams": args.streams, "steps": args.steps,
              "seconds": args.seconds, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "one_device.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
