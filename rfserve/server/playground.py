"""The playground: a static page at `/` and `/playground`, its files under `/static/`, and
`GET /v1/status`, the small JSON summary the page polls.

The status is read from the engine's own metrics objects (the ones `/metrics` exports), so the
page and Prometheus never disagree. "Recent" p50 is what Prometheus would compute as
`histogram_quantile(0.5, increase(rfserve_request_seconds_bucket[window]))`: the bucket counts now
minus those of a snapshot about `window` seconds old, interpolated inside the bucket.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel

from rfserve.server.errors import APIError, Code

STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; generated images are shown from blob: URLs.
HTML_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                           "frame-ancestors 'none'; base-uri 'none'",
                "Cache-Control": "no-cache"}

Buckets = dict[str, list[tuple[float, float]]]     # model → [(upper bound, cumulative count)]


class ChatStatus(BaseModel):
    running: int
    waiting: int
    slots: int
    kv_tokens: int                            # the KV pool (none before the first chat request on the CPU)
    kv_tokens_used: int
    first_token_p50_ms: float | None
    token_gap_p50_ms: float | None


class ModelStatus(BaseModel):
    queue_depth: int
    requests: int
    p50_ms: float | None
    chat: ChatStatus | None = None            # for the models that chat


class ServerStatus(BaseModel):
    status: Literal["ready", "loading", "draining"]
    healthy: bool
    window_s: float
    models: dict[str, ModelStatus]


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile on cumulative buckets sorted by bound (the last is +Inf)."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower           # beyond the largest finite bucket: its bound is all we know
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class RecentLatency:
    """Request-latency buckets over a sliding window, from snapshots of the cumulative histogram."""

    def __init__(self, histogram, window_s: float = 60.0, every_s: float = 1.0):
        self.histogram, self.window_s, self.every_s = histogram, window_s, every_s
        self._snaps: deque[tuple[float, Buckets]] = deque([(time.monotonic(), self._read())])
        self._lock = threading.Lock()

    def _read(self) -> Buckets:
        out: Buckets = {}
        for family in self.histogram.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out.setdefault(s.labels["model"], []).append((float(s.labels["le"]), s.value))
        return {m: sorted(b) for m, b in out.items()}

    def window(self) -> tuple[float, Buckets]:
        """(seconds covered, per-model bucket increases over them)."""
        now, current = time.monotonic(), self._read()
        with self._lock:
            if now - self._snaps[-1][0] >= self.every_s:
                self._snaps.append((now, current))
            # keep the newest snapshot that is at least `window_s` old as the baseline
            while len(self._snaps) > 1 and self._snaps[1][0] <= now - self.window_s:
                self._snaps.popleft()
            since, base = self._snaps[0]
        delta = {m: [(le, n - dict(base.get(m, [])).get(le, 0.0)) for le, n in b] for m, b in current.items()}
        return now - since, delta


def playground_router(engine) -> APIRouter:
    router = APIRouter()
    latency = RecentLatency(engine.metrics.request_seconds)
    first_token = RecentLatency(engine.metrics.chat_first_token)
    token_gap = RecentLatency(engine.metrics.chat_token_gap)
    files = {p.name for p in STATIC.iterdir() if p.is_file()}     # a fixed set: no path ever reaches the disk

    @router.get("/", include_in_schema=False)
    @router.get("/playground", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=HTML_HEADERS)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in files:
            raise APIError(Code.NOT_FOUND, f"no static file {name!r}", param="name")
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    @router.get("/v1/status", response_model=ServerStatus)
    async def status():
        """Readiness, and per model the queue depth and the p50 request latency of the last minute; for
        chat models also the running and waiting sequences and the p50 first-token time and token gap."""
        covered, recent = latency.window()
        _, firsts = first_token.window()
        _, gaps = token_gap.window()
        if engine.draining.is_set():
            state = "draining"
        else:
            state = "ready" if engine.ready.is_set() else "loading"
        models = {}
        for spec in engine.specs:
            buckets = recent.get(spec.name, [])
            p50 = quantile(0.5, buckets)
            chat = None
            model = engine.models.get(spec.name)
            if model is not None and model.chat is not None:
                batcher = engine.chat_batchers.get(spec.name)
                running, waiting = batcher.load if batcher else (0, 0)
                pool = batcher.decoder.blocks if batcher else None
                chat = ChatStatus(running=running, waiting=waiting,
                                  slots=engine.config.chat.slots_on(engine.device.type),
                                  kv_tokens=pool.capacity * batcher.decoder.page if batcher and pool else 0,
                                  kv_tokens_used=(pool.capacity - pool.free_blocks) * batcher.decoder.page
                                  if batcher and pool else 0,
                                  first_token_p50_ms=_ms(quantile(0.5, firsts.get(spec.name, []))),
                                  token_gap_p50_ms=_ms(quantile(0.5, gaps.get(spec.name, []))))
            models[spec.name] = ModelStatus(queue_depth=engine.batcher.depth(spec.name),
                                            requests=int(buckets[-1][1]) if buckets else 0, p50_ms=_ms(p50),
                                            chat=chat)
        return ServerStatus(status=state, healthy=engine.healthy[0], window_s=round(covered, 1), models=models)

    return router


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
