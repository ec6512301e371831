"""The worker thread: owns the pipelines, runs one batch at a time, resolves futures.

An exception fails only the jobs of its own batch; the thread keeps serving.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from model_zoo.base import BatchOutput
from server.metrics import Metrics
from server.scheduler import Batch, Batcher, JobCancelled

log = logging.getLogger("rfserve.worker")
FAULT_MARKER = "__rfserve_fault__"


class PipelineError(Exception):
    """A batch failed inside a pipeline; the message is safe to return to clients."""


class Worker:
    def __init__(self, batcher: Batcher, pipelines: dict[str, object], metrics: Metrics,
                 *, fault_injection: bool = False):
        self.batcher, self.pipelines, self.metrics = batcher, pipelines, metrics
        self.fault_injection = fault_injection
        self._thread = threading.Thread(target=self._loop, name="rfserve-worker", daemon=True)
        self.last_beat = time.monotonic()
        self.busy_since: float | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            batch = self.batcher.next_batch(timeout=1.0)
            if batch is None:
                if self.batcher.closed:
                    return
                continue
            self.busy_since = time.monotonic()
            try:
                self.run_batch(batch)
            finally:
                self.busy_since = None

    def run_batch(self, batch: Batch) -> None:
        live = [sl for sl in batch.slices if not sl.job.cancelled]
        for sl in batch.slices:
            if sl.job.cancelled:
                self.batcher.on_drop(batch.model, "client_gone")
                sl.job.fail(JobCancelled())
        if not live:
            return
        batch = Batch(batch.model, live)
        specs = batch.specs
        self.metrics.batch_size.labels(batch.model).observe(len(specs))
        start = time.perf_counter()
        try:
            self._check_fault(specs)
            with torch.inference_mode():
                out: BatchOutput = self.pipelines[batch.model].run(specs)
        except Exception as exc:  # noqa: BLE001 — any pipeline failure fails only this batch
            log.exception("batch of %d on %s failed", len(specs), batch.model)
            err = PipelineError(f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
            for sl in batch.slices:
                sl.job.fail(err)
            return
        elapsed = time.perf_counter() - start
        self.batcher.observe(batch.model, elapsed * self.batcher.max_batch / max(1, len(specs)))
        for stage, secs in out.timings.items():
            self.metrics.stage_seconds.labels(batch.model, stage).observe(secs)
        row = 0
        for sl in batch.slices:
            for index in range(sl.start, sl.stop):
                sl.job.record(index, out.images[row], out.prompt_truncated[row], out.timings)
                row += 1

    def _check_fault(self, specs) -> None:
        """Test hook for fault injection (off unless the server enables it)."""
        if self.fault_injection and any(FAULT_MARKER in s.prompt for s in specs):
            raise RuntimeError("injected fault")
