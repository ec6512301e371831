"""The batcher on its own: grouping, sizes, slicing, fairness, drops, and Retry-After."""
import threading
import time

import pytest

from rfserve.model_zoo.base import ImageSpec
from rfserve.server.scheduler import Batcher, DeadlineExceeded, DeadlineUnmeetable, Job, JobCancelled, QueueFull


def job(model="a", n=1, size=16, steps=1, guidance=0.0, timeout=60.0):
    specs = [ImageSpec("p", "", i, size, size, steps, guidance) for i in range(n)]
    return Job(model=model, specs=specs, deadline=time.monotonic() + timeout)


def make(**kw):
    args = dict(max_batch=4, max_wait_ms=0, max_queue=100) | kw
    return Batcher(["a", "b"], **args)


def test_groups_only_compatible_jobs_up_to_max_batch():
    """Without joining, only jobs that would run the same loop share a batch."""
    b = make(joining=False)
    jobs = [job(size=16), job(size=32), job(size=16, guidance=2.0), job(size=16), job(size=16, n=3)]
    for j in jobs:
        b.submit(j)
    first = b.next_batch(timeout=0)
    assert [sl.job for sl in first.slices] == [jobs[0], jobs[3], jobs[4]]
    assert first.size == 4 and (first.slices[-1].start, first.slices[-1].stop) == (0, 2)
    assert len({s.batch_key() for s in first.specs}) == 1


def test_with_joining_steps_and_guidance_share_a_batch_and_sizes_do_not():
    b = make()
    jobs = [job(size=16), job(size=32), job(size=16, guidance=2.0, steps=4), job(size=16, steps=50)]
    for j in jobs:
        b.submit(j)
    first = b.next_batch(timeout=0)
    assert [sl.job for sl in first.slices] == [jobs[0], jobs[2], jobs[3]]
    assert len({s.join_key() for s in first.specs}) == 1 and len({s.batch_key() for s in first.specs}) == 3


def test_join_takes_the_queue_head_in_order_and_stops_at_the_first_other_size():
    b = make()
    key = job().specs[0].join_key()
    jobs = [job(steps=4), job(n=3, steps=2), job(size=32), job()]
    for j in jobs:
        b.submit(j)
    taken = b.join("a", key, room=2)
    assert [(sl.job, sl.start, sl.stop) for sl in taken] == [(jobs[0], 0, 1), (jobs[1], 0, 1)]
    taken = b.join("a", key, room=8)
    assert [(sl.job, sl.start, sl.stop) for sl in taken] == [(jobs[1], 1, 3)]
    assert b.join("a", key, room=8) == []                       # the 32x32 job is next: it goes first
    assert b.next_batch(timeout=0).slices[0].job is jobs[2]


def test_join_admits_nothing_while_another_model_waits():
    b = make()
    key = job().specs[0].join_key()
    b.submit(job())
    b.submit(job(model="b"))
    assert b.join("a", key, room=4) == []
    assert b.next_batch(timeout=0).model in {"a", "b"}


def test_large_job_is_served_in_slices_in_order():
    b = make()
    big = job(n=10)
    b.submit(big)
    slices = []
    while (batch := b.next_batch(timeout=0)) is not None:
        slices += [(sl.start, sl.stop) for sl in batch.slices]
    assert slices == [(0, 4), (4, 8), (8, 10)]


def test_waits_for_company_up_to_max_wait():
    b = make(max_wait_ms=150)
    b.submit(job())
    threading.Timer(0.05, lambda: b.submit(job())).start()
    start = time.monotonic()
    batch = b.next_batch(timeout=1)
    assert batch.size == 2 and time.monotonic() - start < 0.15 + 0.1


def test_full_batch_does_not_wait():
    b = make(max_wait_ms=5000)
    for _ in range(4):
        b.submit(job())
    start = time.monotonic()
    assert b.next_batch(timeout=1).size == 4
    assert time.monotonic() - start < 0.5


def test_round_robin_between_models():
    b = make()
    for _ in range(3):
        b.submit(job("a", n=4))
    b.submit(job("b", n=4))
    order = [b.next_batch(timeout=0).model for _ in range(4)]
    assert order[:2] in (["a", "b"], ["b", "a"]) and order.count("b") == 1


def test_cancelled_and_expired_jobs_are_dropped_before_running():
    drops = []
    b = make(on_drop=lambda m, why: drops.append(why))
    gone, late, live = job(), job(timeout=-1), job()
    for j in (gone, late, live):
        b.submit(j) if j is not late else b._queues["a"].append(j)
    gone.cancel()
    batch = b.next_batch(timeout=0)
    assert [sl.job for sl in batch.slices] == [live]
    assert sorted(drops) == ["client_gone", "deadline"]
    with pytest.raises(DeadlineExceeded):
        late.future.result(timeout=0)
    assert gone.future.cancelled()


def test_queue_limit_and_retry_after():
    b = make(max_queue=2)
    b.observe("a", 0.75)                        # seconds per image
    b.submit(job(n=4))
    b.submit(job(n=4))
    with pytest.raises(QueueFull) as full:
        b.submit(job())
    assert full.value.retry_after == 6          # 8 queued images × 0.75 s
    assert not full.value.would_miss_deadline


def test_job_that_would_miss_its_deadline_is_refused_early():
    b = make()
    b.observe("a", 1.0)
    b.submit(job(n=4, timeout=60))
    with pytest.raises(QueueFull) as late:
        b.submit(job(n=4, timeout=6))           # 8 images ahead of its end at 1 s each
    assert late.value.would_miss_deadline and late.value.retry_after == 4
    b.submit(job(n=1, timeout=30))


def test_a_deadline_its_own_images_cannot_meet_is_no_overload():
    """Even an empty queue would not make it, so no Retry-After can help (a 504, not a 429), full queue or not."""
    b = make(max_queue=1)
    b.observe("a", 1.0)
    with pytest.raises(DeadlineUnmeetable) as late:
        b.submit(job(n=4, timeout=3))
    assert late.value.needed_s == 4.0 and 2.9 < late.value.allowed_s <= 3.0
    b.submit(job(n=4, timeout=60))                          # the queue is now full
    with pytest.raises(DeadlineUnmeetable):
        b.submit(job(n=1, timeout=0.5))
    with pytest.raises(QueueFull):
        b.submit(job(n=1, timeout=60))


def test_job_resolves_once_every_image_is_recorded():
    j = job(n=2)
    j.record(1, "img1", False, {"sample": 0.1})
    assert not j.future.done()
    j.record(0, "img0", True, {"sample": 0.2})
    result = j.future.result(timeout=0)
    assert result.images == ["img0", "img1"] and result.prompt_truncated
    assert result.timings["sample"] == 0.2 and "queue" in result.timings


def test_close_wakes_the_worker():
    b = make()
    threading.Timer(0.05, b.close).start()
    assert b.next_batch() is None


def test_job_cancelled_exception_type():
    b = make()
    j = job()
    b.submit(j)
    j.future = type(j.future)()      # a fresh future nobody cancelled
    j.cancelled = True
    assert b.next_batch(timeout=0) is None
    with pytest.raises(JobCancelled):
        j.future.result(timeout=0)


def test_sparse_arrivals_do_not_wait_for_company():
    b = make(max_wait_ms=200)
    b.submit(job())
    b.next_batch(timeout=0.5)
    time.sleep(0.3)                              # one client at a time: arrivals far apart
    b.submit(job())
    start = time.monotonic()
    assert b.next_batch(timeout=1).size == 1
    assert time.monotonic() - start < 0.1
