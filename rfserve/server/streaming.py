"""Streamed image answers in OpenAI's event format: `partial_images` previews taken from the flow itself
(`server.worker`), then one completed event, over server-sent events.

Each event is `event: <type>` and `data: <json>`, the JSON's `type` repeating the event's: the `openai`
client reads the data, a browser's EventSource the names. A failure after the stream began is an `error`
event (`{"type": "error", "error": {...}}`), which the `openai` client raises as an APIError. A client that
leaves cancels its job, and the worker drops its row at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np

from rfserve.server import jobs
from rfserve.server.encoding import encode_all
from rfserve.server.errors import APIError
from rfserve.server.scheduler import Job, JobResult


@dataclass(frozen=True)
class StreamFormat:
    """What every event of one stream echoes, and how its pictures are encoded."""
    kind: str                          # "image_generation" or "image_edit": the events' type prefix
    output_format: str
    output_compression: int
    quality: str
    size: str
    background: str

    def event(self, suffix: str, b64: bytes, **extra) -> str:
        payload = {"type": f"{self.kind}.{suffix}", "b64_json": b64.decode(), "created_at": int(time.time()),
                   "size": self.size, "quality": self.quality, "background": self.background,
                   "output_format": self.output_format, **extra}
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

    async def encode(self, image: np.ndarray, encoded: bytes | None = None) -> bytes:
        """Base64 of `image` in the stream's format; of `encoded` when the worker encoded it on the GPU."""
        (b64,) = await encode_all([image], as_base64=True, fmt=self.output_format, quality=self.output_compression,
                                  encoded=[encoded])
        return b64


def previews_to(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[int, np.ndarray], None]:
    """The job's `on_partial`: hands each preview from the worker thread to the request's event loop."""
    def deliver(index: int, image: np.ndarray) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, image))
        except RuntimeError:          # the loop is gone (server stopping); nobody is listening
            pass
    return deliver


def usage(text_tokens: int) -> dict:
    """OpenAI's image `usage`: the prompt's tokens as the model reads them. The flow models read an edit's
    input as latents, not tokens, and produce latents, so `image_tokens` and `output_tokens` are 0."""
    return {"input_tokens": text_tokens, "output_tokens": 0, "total_tokens": text_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0}}


async def progress(job: Job, previews: asyncio.Queue) -> AsyncIterator[tuple[int, np.ndarray] | JobResult]:
    """The job's previews (index, pixels) as they come, then its result; a failure raises the APIError it
    answers. Leaving early (the client gone) cancels the job, whose row the worker drops at the next step."""
    result = asyncio.wrap_future(job.future)
    try:
        while True:
            nxt = asyncio.ensure_future(previews.get())
            done, _ = await asyncio.wait({nxt, result}, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:                  # previews first: each was queued before the result
                yield nxt.result()
                continue
            nxt.cancel()
            if result not in done:
                raise jobs.past_deadline()
            yield jobs.outcome(result)
            return
    finally:
        if not job.future.done():
            job.cancel()


def error_event(err: APIError) -> str:
    """The `data:` of an error after the stream began: {"type": "error", "error": {message, type, param, code}}."""
    return json.dumps({"type": "error", **json.loads(bytes(err.response().body))})


async def events(job: Job, previews: asyncio.Queue, fmt: StreamFormat, used: dict,
                 done: Callable[[int], None], started: float, warnings: list[str] | None) -> AsyncIterator[str]:
    """The image route's events. The completed event adds our `seed` and `timings` (ms per stage, and the total
    since `started`, a perf_counter time), and the prompt's `warnings` when there are any, as a JSON answer has
    them. `done` gets the status the stream ended with (499 when the client left), for metrics."""
    status = 499
    try:
        async for item in progress(job, previews):
            if isinstance(item, JobResult):
                b64 = await fmt.encode(item.images[0], item.encoded[0])
                timings = {k: round(v * 1000, 3) for k, v in item.timings.items()}
                timings["total"] = round((time.perf_counter() - started) * 1000, 3)
                status = 200
                extra = {} if warnings is None else {"warnings": warnings}
                yield fmt.event("completed", b64, usage=used, seed=job.specs[0].seed, timings=timings, **extra)
            else:
                index, image = item
                yield fmt.event("partial_image", await fmt.encode(image), partial_image_index=index)
    except APIError as err:
        status = err.status
        yield f"event: error\ndata: {error_event(err)}\n\n"
    finally:
        done(status)
