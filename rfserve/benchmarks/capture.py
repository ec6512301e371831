"""Capturing a family's fast path inside a benchmark, as the server's warm-up does, and what the capture cost.

The model benchmarks time our pipelines eagerly, then through the compiled path the server serves with
(`server.engine`: `_warm` for images, `_capture_chat` for chat decode), so that a GPU figure is the server's
figure. Eager runs first: `prepare` swaps the hot calls for good.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch._dynamo.utils import counters

from rfserve.model_zoo.base import FastPath


def add_mode_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-mode", help='torch.compile mode of the compiled run: default "reduce-overhead" '
                                               '(CUDA graphs, as the server) on CUDA, "default" on the CPU; '
                                               '"off" skips the compiled run')


def resolve_mode(flag: str | None, device: torch.device) -> str | None:
    """The mode `--compile-mode` asks for on `device`; None for "off"."""
    if flag == "off":
        return None
    return flag or ("reduce-overhead" if device.type == "cuda" else "default")


def capture(fast: FastPath, warm: Callable[[], object], mode: str | None, *, runs: int = 2) -> dict:
    """`fast.prepare(mode)`, `warm()` `runs` times, `fast.finish_capture()`; the seconds that took and what dynamo
    and inductor counted meanwhile.

    A pipeline's call runs twice, as the engine's warm-up runs each bucket: the first compiles (the `Captured`
    records its shapes), the second records the CUDA graph. A chat decoder's `capture` steps every bucket twice
    itself, so it runs once (`runs=1`).
    """
    counters.clear()
    start = time.perf_counter()
    fast.prepare(mode)
    for _ in range(runs):
        warm()
    fast.finish_capture()
    return {"mode": mode, "capture_s": round(time.perf_counter() - start, 2),
            "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def summary(info: dict) -> str:
    """One capture as a markdown table's footnote reads it."""
    return (f"capture {info['capture_s']:.1f} s, {info['graphs']} graphs, {info['graph_breaks']} graph breaks, "
            f"{info['cudagraph_skips']} CUDA-graph skips")
