"""Per-model bounded queues and the dynamic batcher.

A Job is one HTTP request: n images, a future and a deadline. The batcher picks a model
round-robin (a flood on one model cannot starve another), takes the oldest job there,
waits up to `max_wait_ms` from that job's arrival for compatible company, and hands the
worker at most `max_batch` images. A job larger than `max_batch` is served in slices.
Cancelled or expired jobs are dropped here, before they cost any compute.

Compatible means sharing `ImageSpec.join_key()` when joining is on (the rows of a running batch each have their
own steps, guidance and strength), else `batch_key()`. While a batch runs, `join` hands the worker more of the
same model's queued jobs between steps, in order, as long as no other model is waiting.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rfserve.model_zoo.base import ImageSpec


class QueueFull(Exception):
    """Refused at admission for the work ahead: the queue is at its limit, or what is queued would keep the job
    past its deadline. Both clear as the queue drains, so a retry after `retry_after` seconds may succeed."""

    def __init__(self, retry_after: int, would_miss_deadline: bool = False):
        super().__init__("queue full")
        self.retry_after, self.would_miss_deadline = retry_after, would_miss_deadline


class DeadlineUnmeetable(Exception):
    """Refused at admission: the job's own images take longer than its deadline leaves, at the recent rate,
    even with nothing queued ahead. No wait helps, only a later deadline."""

    def __init__(self, needed_s: float, allowed_s: float):
        super().__init__("deadline cannot be met")
        self.needed_s, self.allowed_s = needed_s, allowed_s


class DeadlineExceeded(Exception):
    pass


class JobCancelled(Exception):
    pass


@dataclass
class JobResult:
    images: list[np.ndarray]          # (H, W, 3) uint8, one per requested image
    prompt_truncated: bool
    timings: dict[str, float]         # seconds: queue, encode, sample, decode
    encoded: list[bytes | None]       # each image's JPEG when the worker encoded it on the GPU (`device_jpeg`)


@dataclass(eq=False)
class Job:
    model: str
    specs: list[ImageSpec]
    deadline: float                   # time.monotonic() seconds
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    next_image: int = 0               # first image not yet handed to the worker
    done_images: int = 0
    started: float | None = None
    device_jpeg: int | None = None    # the JPEG quality to encode at on the GPU, when the batch decodes there
    # A streaming request's previews: how many, and where each goes (its index, its pixels), from the worker.
    partial_images: int = 0
    on_partial: Callable[[int, np.ndarray], None] | None = None
    _partials_sent: int = 0
    _images: dict[int, np.ndarray] = field(default_factory=dict)
    _encoded: dict[int, bytes] = field(default_factory=dict)
    _truncated: bool = False
    _timings: dict[str, float] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return len(self.specs) - self.next_image

    def cancel(self) -> None:
        """The client is gone: the batcher drops the job and nobody waits on the future."""
        self.cancelled = True
        self.future.cancel()

    def preview_due(self, step: int, total: int) -> bool:
        """Whether a preview follows `step` (1-based) of the `total` the sampling loop runs: `partial_images` of
        them, evenly spaced, never at the last, which makes the image itself. So a one-step model sends none."""
        due = {j * total // (self.partial_images + 1) for j in range(1, self.partial_images + 1)}
        return self._partials_sent < self.partial_images and 0 < step < total and step in due

    def send_preview(self, image: np.ndarray) -> None:
        if self.on_partial is not None and self._partials_sent < self.partial_images:
            self.on_partial(self._partials_sent, image)
            self._partials_sent += 1

    def record(self, index: int, image: np.ndarray, truncated: bool, timings: dict[str, float],
               encoded: bytes | None = None) -> None:
        """Store one finished image; resolve the future when the last one lands."""
        self._images[index] = image
        if encoded is not None:
            self._encoded[index] = encoded
        self._truncated |= truncated
        for stage, secs in timings.items():
            self._timings[stage] = max(self._timings.get(stage, 0.0), secs)
        self.done_images += 1
        if self.done_images == len(self.specs) and not self.future.done():
            queue_wait = (self.started or self.arrival) - self.arrival
            result = JobResult([self._images[i] for i in range(len(self.specs))], self._truncated,
                               {"queue": queue_wait, **self._timings},
                               [self._encoded.get(i) for i in range(len(self.specs))])
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class Slice:
    job: Job
    start: int
    stop: int


@dataclass
class Batch:
    model: str
    slices: list[Slice]

    @property
    def specs(self) -> list[ImageSpec]:
        return [s for sl in self.slices for s in sl.job.specs[sl.start:sl.stop]]

    @property
    def size(self) -> int:
        return sum(sl.stop - sl.start for sl in self.slices)


class Batcher:
    def __init__(self, models: list[str], *, max_batch: int, max_wait_ms: float, max_queue: int,
                 on_drop: Callable[[str, str], None] = lambda model, reason: None, joining: bool = True):
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.joining = joining
        self.on_drop = on_drop
        self.max_queue = max_queue
        self._queues: dict[str, deque[Job]] = {m: deque() for m in models}
        self._turn = itertools.cycle(models)
        self._cond = threading.Condition()
        self._closed = False
        self._image_seconds: dict[str, float] = {m: 0.0 for m in models}   # EWMA of batch time per image
        self._last_arrival: dict[str, float] = {}
        self._arrival_gap: dict[str, float] = {m: 0.0 for m in models}     # EWMA of seconds between jobs

    # -- producer side (event loop) ------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            queue = self._queues[job.model]
            self._drop_dead(queue)
            # A deadline the job's own images cannot meet is refused first: no wait helps, full queue or not.
            allowed = job.deadline - time.monotonic()
            needed = self.seconds_for(job.model, len(job.specs))
            if needed > allowed:
                raise DeadlineUnmeetable(needed, allowed)
            if len(queue) >= self.max_queue:
                raise QueueFull(self.retry_after(job.model))
            if self.estimated_wait(job.model, len(job.specs)) > allowed:
                raise QueueFull(self.retry_after(job.model), would_miss_deadline=True)
            queue.append(job)
            self._note_arrival(job.model, job.arrival)
            self._cond.notify()

    def _note_arrival(self, model: str, now: float) -> None:
        last = self._last_arrival.get(model)
        self._last_arrival[model] = now
        if last is not None:
            gap, prev = now - last, self._arrival_gap[model]
            self._arrival_gap[model] = gap if prev == 0 else 0.8 * prev + 0.2 * gap

    def depth(self, model: str) -> int:
        return len(self._queues[model])

    def estimated_wait(self, model: str, extra_images: int = 0) -> float:
        """Seconds until the queued images (plus `extra_images`) are done, at the recent rate."""
        queued = sum(j.remaining for j in self._queues[model]) + extra_images
        return self.seconds_for(model, queued)

    def seconds_for(self, model: str, images: int) -> float:
        """Seconds `images` take at the model's recent rate; 0 until a batch has been measured."""
        return images * self._image_seconds[model]

    def retry_after(self, model: str) -> int:
        """Seconds until the queue has likely drained enough to take one more job."""
        return max(1, math.ceil(self.estimated_wait(model)))

    def observe(self, model: str, seconds_per_image: float) -> None:
        prev = self._image_seconds[model]
        self._image_seconds[model] = seconds_per_image if prev == 0 else 0.8 * prev + 0.2 * seconds_per_image

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Job]:
        """Remove and return everything still queued (used at shutdown)."""
        with self._cond:
            jobs = [j for q in self._queues.values() for j in q]
            for q in self._queues.values():
                q.clear()
            return jobs

    # -- consumer side (worker thread) ---------------------------------------------
    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Block until a batch is ready; None when closed or `timeout` passes idle."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                model = self._pick_model()
                if model is not None:
                    batch = self._form(model)
                    if batch is not None:
                        return batch
                    continue
                wait = None if give_up is None else give_up - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)

    def _pick_model(self) -> str | None:
        for _ in range(len(self._queues)):
            model = next(self._turn)
            self._drop_dead(self._queues[model])
            if self._queues[model]:
                return model
        return None

    def _form(self, model: str) -> Batch | None:
        """Wait (releasing the lock) until the head job has company or waited long enough."""
        queue = self._queues[model]
        head = queue[0]
        # Waiting only pays when company is likely to arrive in time: with sparse traffic
        # (one client in a closed loop, say) the lone job runs at once.
        patience = self.max_wait if self._arrival_gap[model] < self.max_wait else 0.0
        while not self._closed:
            ready_at = head.arrival + patience
            if self._compatible_images(queue, self.key(head)) >= self.max_batch or time.monotonic() >= ready_at:
                break
            self._cond.wait(ready_at - time.monotonic())
            self._drop_dead(queue)
            if not queue or queue[0] is not head:
                return None
        return self._take(model, self.key(head))

    def key(self, job: Job) -> tuple:
        """What jobs that share a batch share."""
        spec = job.specs[0]
        return spec.join_key() if self.joining else spec.batch_key()

    def _compatible_images(self, queue: deque[Job], key: tuple) -> int:
        return sum(j.remaining for j in queue if self.key(j) == key)

    def join(self, model: str, key: tuple, room: int) -> list[Slice]:
        """Up to `room` more images for a batch of `model` running with join key `key`, taken between its steps:
        the jobs at the head of the model's queue that share the key, in order, stopping at the first that does
        not (it goes first once the batch ends). Nothing while another model has jobs waiting: the batch then
        finishes what it holds, and the round-robin goes on."""
        with self._cond:
            queue = self._queues[model]
            self._drop_dead(queue)
            if room <= 0 or any(q for m, q in self._queues.items() if m != model):
                return []
            head = 0
            for job in queue:
                if self.key(job) != key:
                    break
                head += job.remaining
            return self._take(model, key, min(room, head)).slices if head else []

    def _take(self, model: str, key: tuple, room: int | None = None) -> Batch:
        queue, room, slices = self._queues[model], self.max_batch if room is None else room, []
        now = time.monotonic()
        for job in list(queue):
            if room == 0:
                break
            if self.key(job) != key:
                continue
            take = min(room, job.remaining)
            slices.append(Slice(job, job.next_image, job.next_image + take))
            job.next_image += take
            job.started = job.started or now
            room -= take
            if job.remaining == 0:
                queue.remove(job)
        return Batch(model, slices)

    def _drop_dead(self, queue: deque[Job]) -> None:
        now = time.monotonic()
        for job in [j for j in queue if j.cancelled or j.deadline <= now]:
            queue.remove(job)
            self.on_drop(job.model, "client_gone" if job.cancelled else "deadline")
            job.fail(JobCancelled() if job.cancelled else DeadlineExceeded())
