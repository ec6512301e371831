"""Continuous image batching: requests join a running batch between its steps and leave at their own last step,
each making the image it makes alone; a short request never waits for a long batch to end; a joiner that fails
fails alone; with `continuous=False` a batch runs to its end as before."""
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import rfserve.model_zoo.instaflow.pipeline as instaflow
from rfserve.model_zoo.base import BatchOutput, ImageSpec
from rfserve.model_zoo.running import Running, Stepped
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.metrics import Metrics
from rfserve.server.scheduler import Batcher, Job
from rfserve.server.worker import OutOfMemory, PipelineError, Worker

PACED = "synthetic?ms_per_image=10&ms_per_batch=0&sizes=64x64"


def start(models, **config):
    engine = Engine(ServerConfig(models=models, device="cpu", warmup=False, max_wait_ms=0, **config))
    engine.load(progress=False)
    return engine


def paced(engine, steps: int, seed: int = 0):
    spec = replace(engine.default_spec(engine.cards["synthetic"], "x", seed), steps=steps)
    return engine.submit("synthetic", [spec])


@pytest.mark.parametrize("continuous", [True, False])
def test_a_one_step_request_does_not_wait_for_a_fifty_step_batch(continuous):
    """At 10 ms a row-step, the 50-step request takes at least 0.5 s. Joining, the one-step request that arrives
    0.1 s in is answered one or two steps later; without joining, only after the long batch."""
    engine = start([PACED], continuous=continuous)
    try:
        long = paced(engine, 50)
        time.sleep(0.1)
        sent = time.monotonic()
        short = paced(engine, 1, seed=1)
        short.future.result(10)
        waited = time.monotonic() - sent
        assert not long.future.done() if continuous else long.future.done()
        long.future.result(10)
        assert waited < 0.1 if continuous else waited > 0.3
    finally:
        engine.shutdown()


class JoinAt:
    """Wraps the InstaFlow Euler update: the rows it steps each call, and `action` run once, at call `at`."""

    def __init__(self, inner, at: int, action):
        self.inner, self.at, self.action, self.rows = inner, at, action, []

    def __call__(self, x, *args, **kwargs):
        self.rows.append(x.shape[0])
        if len(self.rows) == self.at:
            self.action()
        return self.inner(x, *args, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_sd):
    engine = start([f"instaflow-2rf={tiny_sd}"], max_batch=4, fault_injection=True)
    yield engine
    engine.shutdown()


def spec(engine, seed: int, **changes):
    base = replace(engine.default_spec(engine.cards["instaflow-2rf"], f"a red circle {seed}", seed), steps=6,
                   guidance=2.0)
    return replace(base, **changes)


def alone(engine, one):
    return engine.models["instaflow-2rf"].pipeline.run([one]).images[0]


def joined_mid_way(engine, monkeypatch, first, joiners, at=2, **job):
    """`first` runs; at its step `at` the `joiners` are queued; each is (its job, the update's row counts)."""
    jobs = []
    spy = JoinAt(instaflow.euler_update, at, lambda: jobs.extend(engine.submit("instaflow-2rf", [j], **job)
                                                                   for j in joiners))
    monkeypatch.setattr(instaflow, "euler_update", spy)
    head = engine.submit("instaflow-2rf", [first])
    head.future.result(120)
    return head, jobs, spy.rows


def test_rows_that_join_mid_way_make_their_images_alone(engine, monkeypatch):
    """The joiners differ from the running row and from each other in steps, guidance (one has none: no
    unconditional branch) and seed; each leaves at its own last step."""
    first = spec(engine, 1)
    joiners = [spec(engine, 2, steps=3, guidance=0.0), spec(engine, 3, steps=8, guidance=4.0)]
    head, jobs, rows = joined_mid_way(engine, monkeypatch, first, joiners)
    images = [head.future.result(0).images[0]] + [j.future.result(120).images[0] for j in jobs]
    # The grouped update runs per (step size, guidance or not): row counts per group, step by step.
    assert rows[:2] == [1, 1] and sum(rows) == 6 + 3 + 8
    for one, image in zip([first, *joiners], images):
        assert np.abs(image.astype(int) - alone(engine, one).astype(int)).max() <= 1


def test_a_joiner_that_fails_fails_alone(engine, monkeypatch):
    marker = "__rfserve_fault__:"
    first = spec(engine, 4)
    broken = [spec(engine, 5, prompt=marker + "error"), spec(engine, 6, prompt=marker + "oom")]
    head, jobs, _ = joined_mid_way(engine, monkeypatch, first, broken)
    assert np.abs(head.future.result(0).images[0].astype(int) - alone(engine, first).astype(int)).max() <= 1
    with pytest.raises(PipelineError):
        jobs[0].future.result(120)
    with pytest.raises(OutOfMemory):                       # admission ran out of memory: re-run alone, still out
        jobs[1].future.result(120)


def test_a_joiner_that_only_fits_alone_runs_after_the_batch(engine, monkeypatch):
    first, big = spec(engine, 7), spec(engine, 8, prompt="__rfserve_fault__:oom-batch a red circle")
    head, jobs, _ = joined_mid_way(engine, monkeypatch, first, [big])
    for job, one in [(head, first), (jobs[0], big)]:
        image = job.future.result(120).images[0]
        assert np.abs(image.astype(int) - alone(engine, one).astype(int)).max() <= 1


def test_a_streaming_joiner_gets_its_previews_at_its_own_steps(engine, monkeypatch):
    previews: list[int] = []
    lock = threading.Lock()

    def on_partial(index, image):
        with lock:
            previews.append(index)

    head, jobs, _ = joined_mid_way(engine, monkeypatch, spec(engine, 9), [spec(engine, 10, steps=4)],
                                   partial_images=3, on_partial=on_partial)
    jobs[0].future.result(120)
    assert previews == [0, 1, 2]


class DecodeFails(Stepped):
    """Rows whose seed is 13 fail to decode, before they leave the batch; the others decode to their seed."""

    def begin(self, specs):
        return Running(specs, [False] * len(specs), [s.steps for s in specs], {})

    def step(self, running):
        running.advance()

    def finish(self, running, rows):
        if any(running.specs[i].seed == 13 for i in rows):
            raise RuntimeError("decode failed")
        images = np.stack([np.full((2, 2, 3), running.specs[i].seed, np.uint8) for i in rows])
        running.leave(rows)
        return BatchOutput(images, [False] * len(rows), {})


def test_a_failed_decode_fails_its_rows_and_the_others_go_on_as_they_were():
    """The failed rows leave the running batch too, so every later row is still answered as its own request."""
    batcher = Batcher(["m"], max_batch=8, max_wait_ms=0, max_queue=10)
    worker = Worker(batcher, {"m": DecodeFails()}, Metrics())
    jobs = [Job("m", [ImageSpec("p", "", seed, 8, 8, steps, 0.0)], time.monotonic() + 60)
            for seed, steps in [(13, 1), (21, 3), (22, 2)]]
    for job in jobs:
        batcher.submit(job)
    worker.run_batch(batcher.next_batch(timeout=0))
    with pytest.raises(PipelineError, match="decode failed"):
        jobs[0].future.result(0)
    assert [int(j.future.result(0).images[0][0, 0, 0]) for j in jobs[1:]] == [21, 22]
