"""The worker thread: owns the pipelines and drives one running batch at a time, a denoising step at a time.

Between two steps (model_zoo.base.Pipeline) it sends the previews that are due, gives the device to queued chat,
answers rows whose request was cancelled or passed its deadline, decodes and answers the rows that have taken
all their steps, and, with joining on (`--continuous`, the default), admits queued requests of the same model
and size up to `--max-batch`: a one-step request that arrives during a 50-step batch waits for one step of it,
not fifty. With joining off, a batch is formed once (requests of the same size, steps, guidance use and
strength) and runs to its end.

An exception fails only the requests of its own batch (a joiner whose admission fails, only itself). An
out-of-memory error re-runs the rows still running from their start in halves, without joining, down to single
images; only a request whose image cannot fit alone fails (507). Either way the thread keeps serving. LoRA
adapters (issue #34) are per row: a batch whose rows need more adapters than the device slots splits the same
way, and a joiner whose adapters find no free slot waits for the batch to end, as one out of memory does.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from rfserve.model_zoo.base import ImageSpec, Pipeline
from rfserve.model_zoo.lora.pool import PoolFull
from rfserve.model_zoo.running import Running
from rfserve.server import faults
from rfserve.server.buckets import BucketPlan
from rfserve.server.device import DeviceTurns
from rfserve.server.encoding import device_jpeg
from rfserve.server.metrics import Metrics
from rfserve.server.scheduler import Batch, Batcher, DeadlineExceeded, Job, JobCancelled
from rfserve.server.threads import ThreadPlan

log = logging.getLogger("rfserve.worker")


class PipelineError(Exception):
    """A batch failed inside a pipeline; the message is safe to return to clients."""


class OutOfMemory(PipelineError):
    """One image does not fit in device memory even alone."""


@dataclass(eq=False)
class Row:
    """The request behind one running row: image `index` of `job`, or None for a padding row (the plan's bucket
    size, which repeats the batch's last image). `since` is the batch's stage times when the row joined, so that
    its own times are what it took."""
    job: Job
    index: int | None
    since: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> ImageSpec:
        return self.job.specs[-1 if self.index is None else self.index]


class Worker:
    def __init__(self, batcher: Batcher, pipelines: dict[str, Pipeline], metrics: Metrics,
                 *, turns: DeviceTurns | None = None, fault_injection: bool = False,
                 plans: dict[str, BucketPlan] | None = None, threads: dict[str, ThreadPlan] | None = None,
                 joining: bool = True):
        self.batcher, self.pipelines, self.metrics = batcher, pipelines, metrics
        self.turns = turns or DeviceTurns()       # the engine's, shared with the chat batchers
        self.plans = plans or {}
        self.threads = threads or {}
        self.fault_injection = fault_injection
        self.joining = joining
        self._thread = threading.Thread(target=self._loop, name="rfserve-worker", daemon=True)
        self.busy_since: float | None = None
        self.running_jobs = 0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self.batcher.closed:
            batch = self.batcher.next_batch(timeout=1.0)
            if batch is None:
                continue
            self.busy_since = time.monotonic()
            try:
                self.run_batch(batch)
            finally:
                self.busy_since, self.running_jobs = None, 0

    def run_batch(self, batch: Batch) -> None:
        for sl in batch.slices:
            if sl.job.cancelled:
                self.batcher.on_drop(batch.model, "client_gone")
                sl.job.fail(JobCancelled())
        rows = [Row(sl.job, i) for sl in batch.slices if not sl.job.cancelled for i in range(sl.start, sl.stop)]
        if rows:
            self._serve(batch.model, self._pad(batch.model, rows), self.joining)

    def _serve(self, model: str, rows: list[Row], joining: bool) -> None:
        """Run `rows` to their ends, admitting queued requests between steps when `joining`; every row's
        request gets its answer here (its image, or an error)."""
        pipe, start, answered = self.pipelines[model], time.perf_counter(), 0
        later: list[Row] = []                     # joiners whose admission ran out of memory: served after
        try:
            with self.turns.turn():
                if self.fault_injection:
                    faults.inject([r.spec for r in rows if r.index is not None])
                running = pipe.begin([r.spec for r in rows])
                while True:
                    answered += self._finish(model, pipe, running, rows)
                    if joining and len(running) and not later:
                        self._admit(model, pipe, running, rows, later)
                    if not len(running):
                        break
                    self.running_jobs = len({r.job for r in rows})
                    self.metrics.batch_size.labels(model).observe(len(running))
                    if model in self.threads:
                        self.threads[model].apply(len(running))
                    with running.stage("sample"):
                        pipe.step(running)
                    self._previews(model, pipe, running, rows)
                    self.turns.pause()
                    self._drop_gone(model, running, rows)
        except torch.OutOfMemoryError:
            _release_memory()
            self._split(model, [r for r in rows if r.index is not None])
        except PoolFull:
            self._split(model, [r for r in rows if r.index is not None], oom=False)
        except Exception as exc:  # noqa: BLE001 — any pipeline failure fails only this batch
            log.exception("a batch of %d on %s failed", len(rows), model)
            _fail(rows, _error(exc))
        if answered:
            self.batcher.observe(model, (time.perf_counter() - start) / answered)
        if later:
            self._serve(model, later, joining=False)

    def _split(self, model: str, rows: list[Row], oom: bool = True) -> None:
        """The rows still running re-run from their start in halves, without joining (each image depends only
        on its own spec, so a re-run makes the same image). A batch whose rows use more LoRA adapters than the
        device slots hold splits the same way (`oom` False); one row never does (`LoraConfig`: a request's adapters
        fit the slots together)."""
        if len(rows) <= 1:
            log.warning("one image on %s does not fit in memory", model)
            _fail(rows, OutOfMemory("out of memory: this image does not fit on the device even alone; "
                                    "try a smaller size or fewer steps"))
            return
        half = len(rows) // 2
        if oom:
            self.metrics.oom_splits.labels(model).inc()
        why = "out of memory" if oom else "its LoRA adapters outnumber the slots"
        log.warning("%s on a batch of %d on %s; retrying as %d + %d", why, len(rows), model, half, len(rows) - half)
        self._serve(model, rows[:half], joining=False)
        self._serve(model, rows[half:], joining=False)

    def _finish(self, model: str, pipe: Pipeline, running: Running, rows: list[Row]) -> int:
        """Decode and answer the rows that have taken all their steps; how many images were answered."""
        done = running.finished()
        if not done:
            return 0
        leaving = [rows[i] for i in done]
        rows[:] = _without(rows, done)
        try:
            out = pipe.finish(running, done)
            qualities = {k: q for k, r in enumerate(leaving) if r.index is not None and (q := r.job.device_jpeg)}
            encode_start = time.perf_counter()
            jpeg = device_jpeg(out.device_images, qualities)
            if jpeg:
                out.timings["gpu_jpeg"] = time.perf_counter() - encode_start
        except Exception as exc:  # noqa: BLE001 — a failed decode fails its own rows, the batch goes on
            log.exception("decoding %d images on %s failed", len(leaving), model)
            _fail(leaving, _error(exc))
            if len(running) > len(rows):                        # they failed before leaving: the rest go on alone
                running.leave(done)
            return 0
        for k, row in enumerate(leaving):
            timings = {stage: secs - row.since.get(stage, 0.0) for stage, secs in running.timings.items()}
            timings.update(out.timings)
            if k == 0:
                for stage, secs in timings.items():
                    self.metrics.stage_seconds.labels(model, stage).observe(secs)
            if row.index is not None and not row.job.future.done():
                row.job.record(row.index, out.images[k], out.prompt_truncated[k], timings, jpeg.get(k))
        return sum(r.index is not None for r in leaving)

    def _admit(self, model: str, pipe: Pipeline, running: Running, rows: list[Row], later: list[Row]) -> None:
        """Queued requests of this model that share the running rows' join key fill the batch up to
        `--max-batch` (the batcher keeps order and fairness: `Batcher.join`)."""
        slices = self.batcher.join(model, running.specs[0].join_key(), self.batcher.max_batch - len(running))
        joiners = [Row(sl.job, i, dict(running.timings)) for sl in slices for i in range(sl.start, sl.stop)]
        if joiners:
            self._begin_joiners(model, pipe, running, rows, later, joiners)

    def _begin_joiners(self, model: str, pipe: Pipeline, running: Running, rows: list[Row], later: list[Row],
                       joiners: list[Row]) -> None:
        """`joiners` begin and join, together; when that fails, each alone, so that only a request that cannot
        begin fails. Out of memory, they wait to run once this batch is done."""
        try:
            if self.fault_injection:
                faults.inject([r.spec for r in joiners], batch=len(running) + len(joiners))
            pipe.admit(running, [r.spec for r in joiners])
        except (torch.OutOfMemoryError, PoolFull):          # no memory, or no free LoRA slot: after this batch
            _release_memory()
            later.extend(joiners)
            return
        except Exception as exc:  # noqa: BLE001 — a joiner that cannot begin fails alone
            if len(joiners) > 1:
                for joiner in joiners:
                    self._begin_joiners(model, pipe, running, rows, later, [joiner])
                return
            log.exception("admitting an image on %s failed", model)
            _fail(joiners, _error(exc))
            return
        rows.extend(joiners)

    def _previews(self, model: str, pipe: Pipeline, running: Running, rows: list[Row]) -> None:
        """The previews due after this step, each at its own row's step of its own total."""
        due = [i for i, r in enumerate(rows)
               if r.index is not None and r.job.preview_due(running.done[i], running.steps[i])]
        if not due:
            return
        try:
            for i, image in zip(due, pipe.preview(running, due)):
                rows[i].job.send_preview(image)
        except Exception:  # noqa: BLE001 — a preview that fails costs its stream a picture, never the batch
            log.exception("a preview on %s failed; the images go on", model)

    def _drop_gone(self, model: str, running: Running, rows: list[Row]) -> None:
        """Rows whose request was cancelled, passed its deadline or already failed leave; each such request is
        answered once, now."""
        now = time.monotonic()
        gone = [i for i, r in enumerate(rows) if r.job.cancelled or now > r.job.deadline or r.job.future.done()]
        for job in dict.fromkeys(rows[i].job for i in gone):
            if job.cancelled:
                self.batcher.on_drop(model, "client_gone")
                job.fail(JobCancelled())
            elif not job.future.done():                             # else: failed already, on another row
                self.batcher.on_drop(model, "deadline")
                job.fail(DeadlineExceeded())
        if gone:
            running.leave(gone)
            rows[:] = _without(rows, gone)

    def _pad(self, model: str, rows: list[Row]) -> list[Row]:
        """Padding rows up to the bucket, when the plan says padding is faster."""
        plan = self.plans.get(model)
        size = plan.run_size(len(rows)) if plan else len(rows)
        return rows + [Row(rows[-1].job, None) for _ in range(size - len(rows))]


def _without(rows: list[Row], gone: list[int]) -> list[Row]:
    """`rows` but those at the indices `gone`, in order: what stays of a batch as `Running.leave` keeps it."""
    out = set(gone)
    return [r for i, r in enumerate(rows) if i not in out]


def _error(exc: BaseException) -> PipelineError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return PipelineError(f"generation failed: {type(exc).__name__}" + (f": {detail}" if detail else ""))


def _fail(rows: list[Row], err: PipelineError) -> None:
    for row in rows:
        row.job.fail(err)


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
