"""A request's image job on the engine: submitted (429 when the work queued ahead is too much, 504 at once
when its own images take longer than its deadline), then awaited until its result, its deadline or the client
leaving, whichever comes first, with every outcome mapped to its HTTP status. The images route and chat's
image answers share it, so the same failure gets the same answer on both."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from rfserve.model_zoo.base import ImageSpec
from rfserve.server.engine import Engine, ShuttingDown
from rfserve.server.errors import APIError, Code, not_ready, shutting_down
from rfserve.server.scheduler import (DeadlineExceeded, DeadlineUnmeetable, Job, JobCancelled, JobResult,
                                     QueueFull)
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
    """`options`: those of `Engine.submit`. Overload (a retry may succeed) is a 429 with Retry-After; a deadline
    that even an empty queue cannot meet is a 504, since only a longer one helps: the request's `timeout`, or
    the server's `--request-timeout` when it gave none."""
    try:
        return engine.submit(name, specs, **options)
    except DeadlineUnmeetable as late:
        asked = options.get("timeout_s") is not None
        fix = "ask for a longer timeout" if asked else "the server's --request-timeout is shorter than that"
        raise APIError(Code.DEADLINE_UNMEETABLE, f"{name} takes about {late.needed_s:.3g}s for these images at its "
                       f"recent rate, more than the {max(late.allowed_s, 0):.3g}s the deadline leaves, even with "
                       f"nothing queued; {fix}", param="timeout" if asked else None) from None
    except QueueFull as full:
        why = ("the work queued ahead would keep it past its deadline" if full.would_miss_deadline
               else "the queue is full")
        raise APIError(Code.QUEUE_FULL, f"{name} is overloaded ({why}); retry after {full.retry_after}s",
                       headers={"Retry-After": str(full.retry_after)}) from None


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
            raise APIError(Code.CLIENT_CLOSED, "client closed the request")
        raise past_deadline()
    return outcome(result)


def past_deadline() -> APIError:
    return APIError(Code.DEADLINE_EXCEEDED, "the request passed its deadline before it finished")


def outcome(result: asyncio.Future) -> JobResult:
    """A finished job's result, or its failure as the HTTP error it answers."""
    try:
        return result.result()
    except DeadlineExceeded:
        raise APIError(Code.DEADLINE_EXCEEDED, "the request passed its deadline while queued") from None
    except JobCancelled:
        raise APIError(Code.CLIENT_CLOSED, "client closed the request") from None
    except ShuttingDown as err:
        raise shutting_down(str(err)) from None
    except OutOfMemory as err:
        raise APIError(Code.OUT_OF_MEMORY, str(err)) from None
    except PipelineError as err:
        raise APIError(Code.GENERATION_FAILED, str(err)) from None
