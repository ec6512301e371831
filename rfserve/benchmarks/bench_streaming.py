"""What streaming previews and edits cost, through the engine's batcher and worker (no HTTP), in one run.

    python -m rfserve.benchmarks.bench_streaming [--model rf-shapes-2rf] [--device auto] [--batch 4] [--repeat 5] [--out DIR]

- **Previews:** one batch of `batch` images with 0, 1 and all rows streaming (`partial_images` 3). The extra
  time over the plain batch, divided by the previews sent, is the cost of one preview; every row of a batch
  waits for it, so the batch time against the plain batch is what the plain rows beside a stream pay. For
  scale, one decode of a single row and of the whole batch: a preview decodes its own row only.
- **Edits:** ms per batch, text-to-image against an edit at strength 1 (the same steps, plus the VAE encode)
  and at 0.5 (half the steps), at the model's default step count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rfserve.benchmarks.loadgen import environment
from rfserve.benchmarks.timing import median_ms
from rfserve.model_zoo.base import ImageSpec
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine

PARTIALS = 3


def batch_ms(engine: Engine, model: str, specs: list[ImageSpec], streaming: int) -> tuple[float, int]:
    """Ms from queueing `specs` as one batch (one job each, the first `streaming` of them streamed) to the last
    answer, and the previews the batch sent."""
    got: list[int] = []
    start = time.perf_counter()
    jobs = [engine.submit(model, [s], partial_images=PARTIALS if i < streaming else 0,
                          on_partial=lambda index, image: got.append(index)) for i, s in enumerate(specs)]
    for job in jobs:
        job.future.result(600)
    return (time.perf_counter() - start) * 1e3, len(got)


def interleaved(engine: Engine, model: str, cases: dict[str, tuple[list[ImageSpec], int]],
                repeat: int) -> dict[str, tuple[float, int]]:
    """Each case's median (ms, previews) over `repeat` rounds that run every case once in turn, after one
    warm-up round, so a machine's drift touches every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    sent: dict[str, int] = {}
    for round_ in range(repeat + 1):
        for name, (specs, streaming) in cases.items():
            ms, sent[name] = batch_ms(engine, model, specs, streaming)
            if round_:
                times[name].append(ms)
    return {name: (statistics.median(times[name]), sent[name]) for name in cases}


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture with a little noise: the content does not change the cost, only its size does."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / (width + height)], -1)
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def run(model: str, device: str, batch: int, repeat: int) -> dict:
    engine = Engine(ServerConfig(models=[model], device=device, warmup=False, max_batch=batch, max_wait_ms=200))
    engine.load(progress=False)
    try:
        card = engine.cards[model]
        base = engine.default_spec(card, "a red circle", 0)
        specs = [replace(base, prompt=f"a red circle {i}", seed=i) for i in range(batch)]
        image = photo(base.width, base.height, 0)
        cases = {f"stream {n}": (specs, n) for n in (0, 1, batch)}
        cases.update({f"edit {strength:g}": ([replace(s, strength=strength, image=image) for s in specs], 0)
                      for strength in (1.0, 0.5)})
        measured = interleaved(engine, model, cases, repeat)
        plain = measured["stream 0"][0]
        previews = [{"streaming_rows": n, "batch_ms": ms, "previews": sent, "time_vs_plain": ms / plain}
                    for n in (0, 1, batch) for ms, sent in [measured[f"stream {n}"]]]
        for row in previews:
            row["per_preview_ms"] = (row["batch_ms"] - plain) / row["previews"] if row["previews"] else 0.0
        parts = engine.models[model].pipeline.parts            # type: ignore[attr-defined]  # an SD family
        latents = torch.randn(batch, *parts.latent_shape(base.width, base.height), device=engine.device,
                              dtype=engine.dtype)
        decode = {n: median_ms(lambda: parts.decode(latents[:n]), engine.device, warmup=1, repeat=repeat)
                  for n in (1, batch)}
        edits = {"text_to_image": plain, **{f"edit_strength_{k:g}": measured[f"edit {k:g}"][0] for k in (1.0, 0.5)}}
    finally:
        engine.shutdown()
    return {"model": model, "batch": batch, "steps": base.steps, "size": f"{base.width}x{base.height}",
            "partial_images": PARTIALS, "previews": previews,
            "decode_ms": {"one_row": decode[1], "whole_batch": decode[batch]}, "edits_batch_ms": edits}


def markdown(result: dict, env: dict) -> str:
    r = result
    lines = [f"{r['model']}, batch {r['batch']}, {r['steps']} steps, {r['size']}, "
             f"`partial_images` {r['partial_images']} ({env['device']}, torch {env['torch']}, {env['date'][:10]})", "",
             "| streaming rows | batch ms | × plain batch | previews | ms per preview |", "|---|---|---|---|---|"]
    for p in r["previews"]:
        lines.append(f"| {p['streaming_rows']} | {p['batch_ms']:.1f} | {p['time_vs_plain']:.2f} | {p['previews']} | "
                     f"{p['per_preview_ms']:.2f} |")
    d = r["decode_ms"]
    lines += ["", f"Decoding one row: {d['one_row']:.2f} ms; the whole batch: {d['whole_batch']:.2f} ms.", "",
              "| batch of | ms | ratio to text-to-image |", "|---|---|---|"]
    t2i = r["edits_batch_ms"]["text_to_image"]
    for name, ms in r["edits_batch_ms"].items():
        lines.append(f"| {name.replace('_', ' ')} | {ms:.1f} | {ms / t2i:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rf-shapes-2rf", help="a multi-step model SPEC of an SD family")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/streaming"))
    args = ap.parse_args(argv)
    env, result = environment(), run(args.model, args.device, args.batch, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps({"env": env, **result}, indent=2))
    (args.out / "streaming.md").write_text(markdown(result, env))
    print(markdown(result, env))


if __name__ == "__main__":
    main()
