"""A request's image job on the engine: submitted (429 when the queue is full or the deadline cannot be
met), then awaited until its result, its deadline or the client leaving, whichever comes first, with
every outcome mapped to its HTTP status. The images route and chat's image answers share it, so the
same failure gets the same answer on both."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from rfserve.model_zoo.base import ImageSpec
from rfserve.server.engine import Engine, ShuttingDown
from rfserve.server.errors import APIError, not_ready, shutting_down
from rfserve.server.scheduler import DeadlineExceeded, Job, JobCancelled, JobResult, QueueFull
from rfserve.server.worker import OutOfMemory, PipelineError


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_admitting(engine: Engine) -> None:
    """Images and chat alike: 503 with Retry-After while draining or still loading."""
    if engine.draining.is_set():
        raise shutting_down()
    if not engine.ready.is_set():
        raise not_ready()


def submit(engine: Engine, name: str, specs: list[ImageSpec], **options) -> Job:
    """`options`: those of `Engine.submit`."""
    try:
        return engine.submit(name, specs, **options)
    except QueueFull as full:
        why = "it would not finish before its deadline" if full.would_miss_deadline else "the queue is full"
        raise APIError(429, f"{name} is overloaded ({why}); retry after {full.retry_after}s",
                       code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None


async def wait(job: Job, request: Request) -> JobResult:
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result not in done:
        job.cancel()
        result.cancel()
        if gone in done:
            raise APIError(499, "client closed the request", code="client_closed")
        raise past_deadline()
    return outcome(result)


def past_deadline() -> APIError:
    return APIError(504, "the request passed its deadline before it finished", code="deadline_exceeded")


def outcome(result: asyncio.Future) -> JobResult:
    """A finished job's result, or its failure as the HTTP error it answers."""
    try:
        return result.result()
    except DeadlineExceeded:
        raise APIError(504, "the request passed its deadline while queued", code="deadline_exceeded") from None
    except JobCancelled:
        raise APIError(499, "client closed the request", code="client_closed") from None
    except ShuttingDown as err:
        raise shutting_down(str(err)) from None
    except OutOfMemory as err:
        raise APIError(507, str(err), code="out_of_memory") from None
    except PipelineError as err:
        raise APIError(500, str(err), code="generation_failed") from None
