"""The worker thread: owns the pipelines, runs one batch at a time, resolves futures.

An exception fails only the jobs of its own batch. An out-of-memory error splits the
batch in halves and retries each, down to single images; only a job whose image cannot
fit alone fails (507). Either way the thread keeps serving.

Between denoising steps (`model_zoo.base.between_steps`) the worker gives the device to queued
chat, and takes out the rows of requests that were cancelled or passed their deadline: they are
answered at once and the rest of the batch goes on without them.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from rfserve.model_zoo.base import ImageSpec, Pipeline, Preview, step_hook
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


# Per spec: (image, truncated, its JPEG when encoded on the GPU), its error, or None when its request left
# between steps (answered then).
Rows = list[tuple[np.ndarray, bool, bytes | None] | PipelineError | None]


class BatchAbandoned(Exception):
    """Every row of a running batch left between steps: nothing is left to compute."""


class Worker:
    def __init__(self, batcher: Batcher, pipelines: dict[str, Pipeline], metrics: Metrics,
                 *, turns: DeviceTurns | None = None, fault_injection: bool = False,
                 plans: dict[str, BucketPlan] | None = None, threads: dict[str, ThreadPlan] | None = None):
        self.batcher, self.pipelines, self.metrics = batcher, pipelines, metrics
        self.turns = turns or DeviceTurns()       # the engine's, shared with the chat batchers
        self.plans = plans or {}
        self.threads = threads or {}
        self.fault_injection = fault_injection
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
            self.running_jobs = len(batch.slices)
            try:
                self.run_batch(batch)
            finally:
                self.busy_since, self.running_jobs = None, 0

    def run_batch(self, batch: Batch) -> None:
        for sl in batch.slices:
            if sl.job.cancelled:
                self.batcher.on_drop(batch.model, "client_gone")
                sl.job.fail(JobCancelled())
        live = [sl for sl in batch.slices if not sl.job.cancelled]
        if not live:
            return
        batch = Batch(batch.model, live)
        specs = batch.specs
        jobs = [sl.job for sl in batch.slices for _ in range(sl.start, sl.stop)]      # the job of each spec
        self.metrics.batch_size.labels(batch.model).observe(len(specs))
        start = time.perf_counter()
        timings: dict[str, float] = {}
        rows = self._run_splitting(batch.model, specs, jobs, timings)
        self.batcher.observe(batch.model, (time.perf_counter() - start) / len(specs))
        for stage, secs in timings.items():
            self.metrics.stage_seconds.labels(batch.model, stage).observe(secs)
        row = 0
        for sl in batch.slices:
            for index in range(sl.start, sl.stop):
                result = rows[row]
                if isinstance(result, PipelineError):
                    sl.job.fail(result)
                elif result is not None:
                    sl.job.record(index, result[0], result[1], timings, result[2])
                row += 1

    def _run_splitting(self, model: str, specs: list[ImageSpec], jobs: list[Job],
                       timings: dict[str, float]) -> Rows:
        kept: list[int] = []                      # the spec (padded row) behind each row still running
        try:
            if self.fault_injection:
                faults.inject(specs)
            padded = self._pad(model, specs)
            kept.extend(range(len(padded)))
            if model in self.threads:
                self.threads[model].apply(len(padded))
            steps = [0]                           # steps done, counted at each `between_steps`
            with self.turns.turn():
                with step_hook(lambda preview, total: self._between_steps(model, kept, jobs, steps, preview, total)):
                    out = self.pipelines[model].run(padded)
                qualities = {k: q for k, spec in enumerate(kept)
                             if spec < len(specs) and (q := jobs[spec].device_jpeg) is not None}
                encode_start = time.perf_counter()
                jpeg = device_jpeg(out.device_images, qualities)
                if jpeg:
                    timings["gpu_jpeg"] = timings.get("gpu_jpeg", 0.0) + time.perf_counter() - encode_start
        except BatchAbandoned:
            return [None] * len(specs)
        except torch.OutOfMemoryError:
            _release_memory()
            if len(specs) == 1:
                log.warning("one image on %s does not fit in memory", model)
                return [OutOfMemory("out of memory: this image does not fit on the device even alone; "
                                    "try a smaller size or fewer steps")]
            half = len(specs) // 2
            self.metrics.oom_splits.labels(model).inc()
            log.warning("out of memory on a batch of %d on %s; retrying as %d + %d",
                        len(specs), model, half, len(specs) - half)
            return (self._run_splitting(model, specs[:half], jobs[:half], timings)
                    + self._run_splitting(model, specs[half:], jobs[half:], timings))
        except Exception as exc:  # noqa: BLE001 — any pipeline failure fails only this batch
            log.exception("batch of %d on %s failed", len(specs), model)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            err = PipelineError(f"generation failed: {type(exc).__name__}" + (f": {detail}" if detail else ""))
            return [err] * len(specs)
        for stage, secs in out.timings.items():
            timings[stage] = timings.get(stage, 0.0) + secs
        rows: Rows = [None] * len(specs)
        for k, spec in enumerate(kept):
            if spec < len(specs):                                                       # padding dropped
                rows[spec] = (out.images[k], out.prompt_truncated[spec], jpeg.get(k))
        return rows

    def _between_steps(self, model: str, kept: list[int], jobs: list[Job], steps: list[int],
                       preview: Preview, total: int) -> list[int] | None:
        """Send the previews due now, let queued chat run, then drop the rows whose request is gone; the rows to
        keep, or None."""
        steps[0] += 1
        due = [k for k, spec in enumerate(kept) if spec < len(jobs) and jobs[spec].preview_due(steps[0], total)]
        if due:
            try:
                for k, image in zip(due, preview(due)):
                    jobs[kept[k]].send_preview(image)
            except Exception:  # noqa: BLE001 — a preview that fails costs its stream a picture, never the batch
                log.exception("a preview on %s failed; the images go on", model)
        self.turns.pause()
        now, keep, gone = time.monotonic(), [], set()
        for k, spec in enumerate(kept):
            job = jobs[min(spec, len(jobs) - 1)]                  # padding rows belong to the last spec's job
            if job.cancelled or now > job.deadline:
                gone.add(job)
            else:
                keep.append(k)
        for job in gone:                                          # answered now, once each
            self.batcher.on_drop(model, "client_gone" if job.cancelled else "deadline")
            job.fail(JobCancelled() if job.cancelled else DeadlineExceeded())
        if not gone:
            return None
        if not keep:
            raise BatchAbandoned()
        kept[:] = [kept[k] for k in keep]
        return keep

    def _pad(self, model: str, specs: list[ImageSpec]) -> list[ImageSpec]:
        """Repeat the last spec up to the bucket when the plan says padding is faster."""
        plan = self.plans.get(model)
        size = plan.run_size(len(specs)) if plan else len(specs)
        return specs + [specs[-1]] * (size - len(specs))


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
