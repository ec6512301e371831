"""How many torch threads each batch size runs on, when serving on CPU.

On a CPU the HTTP loop, PNG encoding and the model share a few cores. A small batch is
mostly per-op dispatch overhead: extra intra-op threads add synchronisation and take the
core that serving needs. A large batch is arithmetic, and every core pays. Where that line
falls depends on the model and the image size, so warm-up measures it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from rfserve.model_zoo.fast_path import THREAD_COUNT

# Extra threads must be clearly faster, not just faster: warm-up timings are noisy, and under
# load the threads also compete with the HTTP loop.
WIDE_MARGIN = 0.9
# A single image slower than this is compute-bound: every size runs wide, unmeasured.
COMPUTE_BOUND_S = 0.25
# Timed seconds after which no new round starts (at least two always run), so a slow or
# oversubscribed CPU cannot stretch warm-up.
BUDGET_S = 5.0


def usable_cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    base: int                       # threads for batches below `wide_from`
    wide: int                       # threads from `wide_from` images up (all cores)
    wide_from: int | None = None    # None: never wide

    def threads_for(self, n: int) -> int:
        return self.wide if self.wide_from is not None and n >= self.wide_from else self.base

    def apply(self, n: int) -> None:
        """Set the count for a batch of n, unless a compile on the capture thread holds it for its graph's
        guard (model_zoo.fast_path): that batch then runs at the held count rather than wait minutes."""
        threads = self.threads_for(n)
        if torch.get_num_threads() != threads and THREAD_COUNT.acquire(blocking=False):
            try:
                torch.set_num_threads(threads)
            finally:
                THREAD_COUNT.release()

    def describe(self) -> str:
        if self.wide_from is None:
            return f"{self.base} thread(s) at every batch size"
        if self.wide_from == 1:
            return f"{self.wide} threads at every batch size"
        return f"{self.base} thread(s) below {self.wide_from} images, {self.wide} from {self.wide_from}"

    @classmethod
    def measure(cls, sizes: tuple[int, ...], base: int, wide: int, seconds: Callable[[int, int], float],
                single_image_s: float, rounds: int = 7, budget_s: float = BUDGET_S) -> "ThreadPlan":
        """`seconds(n, threads)` times one batch of n. Every size and thread count is timed
        once per round and keeps its best time, so a burst of other work (the HTTP server
        starting beside warm-up, say) spoils rounds, not decisions. Wide threads start at
        the smallest size from which every larger one gains from them.

        So a round times the sizes from the largest down, and stops below the first one where wide threads
        do not (yet) clearly gain: no smaller size can change the plan then. Where wide threads lose at the
        largest batch, as for a small model on two busy cores, a round is two timings, not one per size and
        thread count; and the slow wide runs it skips are the ones that made warm-up take a minute."""
        if wide <= base:
            return cls(base, base)
        if single_image_s >= COMPUTE_BOUND_S:
            return cls(base, wide, 1)
        ordered = sorted(set(sizes), reverse=True)
        best = {(n, t): float("inf") for n in ordered for t in (base, wide)}
        spent = 0.0
        for done in range(rounds):
            if done >= 2 and spent >= budget_s:
                break
            for n in ordered:
                for threads in (base, wide):
                    took = seconds(n, threads)
                    best[n, threads] = min(best[n, threads], took)
                    spent += took
                if not _gains(best, n, base, wide):
                    break
        wide_from = None
        for n in ordered:
            if not _gains(best, n, base, wide):
                break
            wide_from = n
        return cls(base, wide, wide_from)


def _gains(best: dict[tuple[int, int], float], n: int, base: int, wide: int) -> bool:
    """Whether wide threads are clearly faster at n, by the best times so far."""
    return best[n, wide] <= WIDE_MARGIN * best[n, base]
