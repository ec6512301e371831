"""Device timing shared by the benchmarks: CUDA events on GPU, the wall clock on CPU."""
from __future__ import annotations

import statistics
import time
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
