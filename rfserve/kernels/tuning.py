"""When the kernels' choices may be timed, and the size buckets they are kept by.

Two choices are timed on the device: the dispatcher's (a Triton kernel or its torch twin, per op and shape) and
the attention kernel's tile configuration (its autotuner). Timing costs milliseconds per shape, and a tile's first
compile seconds, so both belong to warm-up, which runs every size a served model accepts at every batch bucket
(server.engine). Sizes are kept by power-of-two bucket, so a new prompt length or a batch of three lands in a
bucket warm-up timed. Once the server is ready (`freeze`), a bucket warm-up could not reach takes the choice of the
nearest timed bucket of the same kind, and nothing is timed: a request never waits on a benchmark.

The state is a plain module global, not an Event: the dispatcher reads it only outside torch.compile's tracing,
and a traced read would become a guard that recompiles every captured graph when the server turns ready.
"""
from __future__ import annotations

import math
from typing import Iterable

_frozen = False


def freeze() -> None:
    """Time nothing from now on (the engine, at ready)."""
    global _frozen
    _frozen = True


def thaw() -> None:
    """Time new buckets again (the engine, before its warm-up)."""
    global _frozen
    _frozen = False


def frozen() -> bool:
    return _frozen


def bucket(n: int) -> int:
    """The power of two at or above n (1 for 0 and 1)."""
    return 1 << max(n - 1, 0).bit_length()


def buckets(sizes: Iterable[int]) -> tuple[int, ...]:
    return tuple(bucket(n) for n in sizes)


def nearest(sizes: tuple[int, ...], known: Iterable[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The known bucket closest to `sizes`, in powers of two summed over the dimensions; of two as close, the
    larger, whose choice was made for at least as much work. None when nothing is known."""
    def distance(k: tuple[int, ...]) -> tuple[float, int]:
        return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(k, sizes)), -sum(k)
    return min(known, key=distance, default=None)
