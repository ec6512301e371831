"""Device timing shared by the benchmarks: CUDA events on GPU, the wall clock on CPU; and how a model benchmark
names its device and writes its report."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds for one call of `fn`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeat: int) -> float:
    """Median of `repeat` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn, device) for _ in range(repeat))


def device_label(device: torch.device) -> str:
    """The hardware line of a figure: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_report(out: Path, stem: str, result: dict, markdown: Callable[[dict], str]) -> None:
    """`stem`.json and `stem`.md in `out`, and the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
