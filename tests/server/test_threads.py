"""CPU thread plans: measured at warm-up, applied per batch by the worker."""
import time

import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import BatchOutput, ImageSpec
from rfserve.model_zoo.running import Running, Stepped
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.metrics import Metrics
from rfserve.server.scheduler import Batcher, Job
from rfserve.server.threads import ThreadPlan
from rfserve.server.worker import Worker


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def costs(table):
    """A `seconds(n, threads)` that looks up `table` and records every call."""
    calls = []

    def seconds(n, threads):
        calls.append((n, threads))
        return table[n, threads]

    return seconds, calls


def test_wide_from_the_smallest_size_where_all_cores_pay():
    seconds, calls = costs({(16, 2): 5.0, (16, 1): 9.0, (8, 2): 3.0, (8, 1): 4.0,
                            (4, 2): 2.0, (4, 1): 2.1, (2, 2): 1.0, (2, 1): 2.0})
    plan = ThreadPlan.measure((2, 4, 8, 16), 1, 2, seconds, single_image_s=0.01, rounds=3,
                              budget_s=float("inf"))
    assert plan.wide_from == 8        # 4 gains under the margin, so 2's gain does not count
    # Each round times both counts from the largest size down to 4, the first that does not gain:
    # 2 cannot change the plan, so it is never timed.
    assert calls == [(n, t) for n in (16, 8, 4) for t in (1, 2)] * 3
    assert [plan.threads_for(n) for n in (1, 4, 7, 8, 13, 16)] == [1, 1, 1, 2, 2, 2]


def test_a_round_stops_at_the_largest_size_where_wide_does_not_pay():
    seconds, calls = costs({(8, 2): 2.0, (8, 1): 1.0, (4, 2): 0.1, (4, 1): 1.0})
    plan = ThreadPlan.measure((4, 8), 1, 2, seconds, single_image_s=0.01, rounds=3, budget_s=float("inf"))
    assert plan.wide_from is None     # 4 gains, but 8 does not: never wide
    assert calls == [(8, 1), (8, 2)] * 3


def test_a_burst_of_noise_cannot_decide():
    burst = iter(range(8))            # the first two rounds of wide runs are slowed

    def seconds(n, threads):
        return 2.0 if threads == 1 else (9.0 if next(burst, 8) < 4 else 1.0)

    plan = ThreadPlan.measure((4, 8), 1, 2, seconds, single_image_s=0.01, rounds=5, budget_s=float("inf"))
    assert plan.wide_from == 4


def test_a_slow_cpu_stops_timing_after_two_rounds_past_the_budget():
    seconds, calls = costs({(8, 2): 3.0, (8, 1): 4.0})
    plan = ThreadPlan.measure((8,), 1, 2, seconds, single_image_s=0.01, rounds=7, budget_s=1.0)
    assert len(calls) == 2 * 2 and plan.wide_from == 8


def test_never_wide_when_it_does_not_pay_or_there_is_one_core():
    seconds, calls = costs({(8, 2): 1.0, (8, 1): 1.0, (4, 2): 0.5, (4, 1): 1.0})
    assert ThreadPlan.measure((4, 8), 1, 2, seconds, single_image_s=0.01).wide_from is None
    calls.clear()
    alone = ThreadPlan.measure((1, 8), 1, 1, seconds, single_image_s=1.0)
    assert alone.threads_for(8) == 1 and alone.wide_from is None and not calls


def test_a_compute_bound_model_runs_wide_everywhere_unmeasured():
    seconds, calls = costs({})
    plan = ThreadPlan.measure((1, 8), 1, 4, seconds, single_image_s=2.0)
    assert plan.threads_for(1) == 4 and not calls


class ThreadRecordingPipeline(Stepped):
    """Records the rows and the thread count of every step."""

    def __init__(self):
        self.threads = []

    def begin(self, specs):
        return Running(specs, [False] * len(specs), [s.steps for s in specs], {})

    def step(self, running):
        self.threads.append((len(running), torch.get_num_threads()))
        running.advance()

    def finish(self, running, rows):
        running.leave(rows)
        return BatchOutput(np.zeros((len(rows), 2, 2, 3), np.uint8), [False] * len(rows), {})


def test_worker_sets_threads_per_batch(restore_threads):
    pipe = ThreadRecordingPipeline()
    batcher = Batcher(["m"], max_batch=8, max_wait_ms=0, max_queue=10)
    worker = Worker(batcher, {"m": pipe}, Metrics(), threads={"m": ThreadPlan(1, 2, wide_from=4)})
    for n in (2, 4, 1):
        batcher.submit(Job("m", [ImageSpec("p", "", s, 8, 8, 1, 0.0) for s in range(n)], time.monotonic() + 60))
        worker.run_batch(batcher.next_batch(timeout=0))
    assert pipe.threads == [(2, 1), (4, 2), (1, 1)]


def test_engine_plans_threads_on_cpu_unless_fixed(tiny_sd, restore_threads):
    spec = f"instaflow-0.9b={tiny_sd}"
    measured = Engine(ServerConfig(models=[spec], device="cpu", max_batch=4, compile="off"))
    try:
        measured.load(progress=False)
    finally:
        measured.shutdown()
    plan = measured.thread_plans["instaflow-0.9b"]
    assert plan.base == max(1, plan.wide - 1) and plan.wide_from in (None, 1, 2, 4)
    assert torch.get_num_threads() == plan.base          # measuring leaves the serving default
    fixed = Engine(ServerConfig(models=[spec], device="cpu", max_batch=4, cpu_threads=1, compile="off"))
    try:
        fixed.load(progress=False)
    finally:
        fixed.shutdown()
    assert fixed.thread_plans == {} and torch.get_num_threads() == 1
