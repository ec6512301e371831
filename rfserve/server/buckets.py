"""Batch buckets for the compiled fast path.

Compiled graphs (and CUDA graphs) are static-shape, so the fast path is captured for a
few batch sizes. A partial batch of n images either runs eagerly at n, or is padded with
throw-away rows up to the next bucket — whichever warm-up measured faster. Padding rows
are dropped before anything is returned.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BucketPlan:
    buckets: tuple[int, ...] = ()                    # ascending; empty: no padding at all
    pad: dict[int, bool] = field(default_factory=dict)

    def bucket_for(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def run_size(self, n: int) -> int:
        bucket = self.bucket_for(n)
        return bucket if bucket is not None and self.pad.get(n, False) else n

    @classmethod
    def measure(cls, buckets: tuple[int, ...], seconds: Callable[[int], float]) -> "BucketPlan":
        """`seconds(n)` times one batch of n; pad n up only where the bucket is faster."""
        buckets = tuple(sorted(set(buckets)))
        timed: dict[int, float] = {}

        def cost(n: int) -> float:
            if n not in timed:
                timed[n] = seconds(n)
            return timed[n]

        plan = cls(buckets)
        for n in range(1, buckets[-1] + 1 if buckets else 1):
            bucket = plan.bucket_for(n)
            if bucket is not None and bucket != n:
                plan.pad[n] = cost(bucket) < cost(n)
        return plan
