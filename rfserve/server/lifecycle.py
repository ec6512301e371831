"""Graceful shutdown and the hung-batch watchdog.

SIGTERM/SIGINT: stop admitting (new requests get 503, /ready turns 503), let queued and
running jobs finish for up to `grace_s`, answer whatever is still queued with 503, then
let uvicorn close. The process exits 0. A second signal stops at once.
"""
from __future__ import annotations

import logging
import threading
import time

import uvicorn

from rfserve.server.engine import Engine

log = logging.getLogger("rfserve.lifecycle")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining.is_set() or not self.engine.ready.is_set():
            self.should_exit = True
            self.force_exit = self.engine.draining.is_set()
            return
        log.info("signal %s: draining for up to %.0fs", sig, self.grace_s)
        self.engine.draining.set()
        threading.Thread(target=self._drain, name="rfserve-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.engine.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.engine.fail_queued("the server is shutting down")
        self.should_exit = True


class Watchdog:
    """Marks the engine unhealthy while one image batch or chat step has run longer than `limit_s`, so
    the orchestrator's liveness probe (/health) restarts the pod."""

    def __init__(self, engine: Engine, limit_s: float, period_s: float = 0.5):
        self.engine, self.limit, self.period = engine, limit_s, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rfserve-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            since = self.engine.busy_since
            stuck = since is not None and time.monotonic() - since > self.limit
            if stuck and not self.engine.stuck_reason:
                log.error("a forward has run for over %.0fs: reporting unhealthy", self.limit)
            self.engine.stuck_reason = (f"a forward has run for over {self.limit:.0f}s" if stuck else None)
