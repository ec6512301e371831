"""The HTTP gateway: validates, queues, awaits the worker, encodes off the loop."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_zoo.base import ImageSpec, ModelCard, parse_size
from model_zoo.seeding import random_seed
from server import __version__, contract
from server.chat import chat_router
from server.encoding import encode_all
from server.engine import Engine, ShuttingDown
from server.errors import (APIError, api_error_handler, documented, http_error_handler, not_ready, shutting_down,
                           validation_handler)
from server.image_store import ImageStore
from server.limits import BodyLimitMiddleware
from server.playground import playground_router
from server.scheduler import DeadlineExceeded, Job, JobCancelled, JobResult, QueueFull
from server.schemas import (Health, ImageData, ImageGenerationRequest, ImagesResponse, ModelList, ModelObject,
                            Readiness)
from server.security import APIKeyMiddleware
from server.worker import OutOfMemory, PipelineError

log = logging.getLogger("rfserve.api")

STARTED = int(time.time())


def create_app(engine: Engine) -> FastAPI:
    config = engine.config
    app = FastAPI(title="rfserve", version=__version__, summary="OpenAI-compatible rectified-flow image server")
    app.state.engine = engine
    store = ImageStore(config.image_store_items, config.image_store_ttl_s)
    metrics = engine.metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=config.api_keys, protect_metrics=config.protect_metrics)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=documented(400, 404, 413, 429, 499, 500, 503, 504, 507))
    async def generate_images(body: ImageGenerationRequest, request: Request):
        start = time.perf_counter()
        name = body.model if body.model is not None else (engine.specs[0].name if engine.specs else "")
        try:
            if engine.draining.is_set():
                raise shutting_down()
            if not engine.ready.is_set():
                raise not_ready()
            card = engine.cards.get(name)
            if card is None:
                raise APIError(404, f"model {name!r} is not served here; available: {sorted(engine.cards)}",
                               param="model", code="model_not_found")
            specs = _specs(body, card, config.max_images_per_request)
            if body.timeout is not None and body.timeout > config.max_request_timeout_s:
                raise APIError(400, f"timeout must be at most {config.max_request_timeout_s:g} seconds",
                               param="timeout")
            if config.log_prompts:
                log.info("request model=%s seed=%d prompt=%r", name, specs[0].seed, body.prompt)
            try:
                job = engine.submit(name, specs, timeout_s=body.timeout)
            except QueueFull as full:
                why = ("it would not finish before its deadline" if full.would_miss_deadline
                       else "the queue is full")
                raise APIError(429, f"{name} is overloaded ({why}); retry after {full.retry_after}s",
                               code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None
            result = await _await_job(job, request)
            images = await encode_all(result.images, as_base64=body.response_format == "b64_json")
        except APIError as err:
            metrics.requests.labels(name if name in engine.cards else "unknown", str(err.status)).inc()
            raise
        if body.response_format == "url":
            data = [ImageData(url=f"{request.base_url}v1/images/{store.put(png)}") for png in images]
        else:
            data = [ImageData(b64_json=b64) for b64 in images]
        kept = getattr(engine.models[name].pipeline, "kept_prompt", None)
        if result.prompt_truncated and kept is not None:
            text = kept(body.prompt)
            for d in data:
                d.revised_prompt = text
        timings = {k: round(v * 1000, 3) for k, v in result.timings.items()}
        timings["total"] = round((time.perf_counter() - start) * 1000, 3)
        metrics.requests.labels(name, "200").inc()
        metrics.images.labels(name).inc(len(data))
        metrics.request_seconds.labels(name).observe(time.perf_counter() - start)
        return ImagesResponse(created=int(time.time()), data=data, model=name, seed=specs[0].seed,
                              prompt_truncated=result.prompt_truncated, timings=timings)

    @app.get("/v1/images/{image_id}", response_class=Response, responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "a `url` result, kept for an hour"}, **documented(404)})
    async def get_image(image_id: str):
        png = store.get(image_id)
        if png is None:
            raise APIError(404, f"image {image_id!r} not found or expired", param="image_id")
        return Response(png, media_type="image/png")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[_model_object(c) for c in engine.cards.values()])

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             responses={503: {"model": Health, "description": "the worker stopped, or a batch is stuck"}})
    async def health():
        ok, why = engine.healthy
        return Health(status="ok") if ok else JSONResponse({"status": "unhealthy", "error": why}, 503)

    @app.get("/ready", response_model=Readiness, response_model_exclude_none=True,
             responses={503: {"model": Readiness, "description": "loading, or draining"}})
    async def ready():
        if engine.draining.is_set():
            return JSONResponse({"status": "draining"}, 503)
        if engine.ready.is_set():
            return Readiness(status="ready", models=sorted(engine.cards))
        return JSONResponse({"status": "loading"}, 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(chat_router(engine))
    app.include_router(playground_router(engine))
    contract.install(app, engine)
    return app


def _specs(body: ImageGenerationRequest, card: ModelCard, max_n: int) -> list[ImageSpec]:
    """Fill defaults from the model card and check every field against it."""
    d = card.defaults
    if body.n > max_n:
        raise APIError(400, f"n must be between 1 and {max_n}", param="n")
    size = d.size if body.size is None else body.size
    if size not in card.sizes:
        raise APIError(400, f"size {body.size!r} is not supported by {card.name}; allowed: {list(card.sizes)}",
                       param="size")
    steps = body.num_inference_steps or d.steps
    if steps > card.max_steps:
        raise APIError(400, f"num_inference_steps must be between 1 and {card.max_steps}",
                       param="num_inference_steps")
    guidance = d.guidance if body.guidance_scale is None else body.guidance_scale
    if guidance > card.max_guidance:
        raise APIError(400, f"guidance_scale must be between 0 and {card.max_guidance}", param="guidance_scale")
    seed = random_seed() if body.seed is None else body.seed
    if body.negative_prompt is not None and not card.supports_negative_prompt:
        raise APIError(400, f"{card.name} does not take a negative_prompt", param="negative_prompt")
    negative = d.negative_prompt if body.negative_prompt is None else body.negative_prompt
    width, height = parse_size(size)
    return [ImageSpec(body.prompt, negative, seed + i, width, height, steps, guidance) for i in range(body.n)]


async def _await_job(job: Job, request: Request) -> JobResult:
    """Wait for the worker, the deadline or the client leaving, whichever comes first."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
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
        raise APIError(504, "the request passed its deadline before it finished", code="deadline_exceeded")
    try:
        return result.result()
    except DeadlineExceeded:
        raise APIError(504, "the request passed its deadline while queued", code="deadline_exceeded") from None
    except JobCancelled:
        raise APIError(499, "client closed the request", code="client_closed") from None
    except ShuttingDown as err:
        raise APIError(503, str(err), code="shutting_down") from None
    except OutOfMemory as err:
        raise APIError(507, str(err), code="out_of_memory") from None
    except PipelineError as err:
        raise APIError(500, str(err), code="generation_failed") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_object(card: ModelCard) -> ModelObject:
    d = card.defaults
    return ModelObject(id=card.name, created=STARTED, family=card.family, sizes=list(card.sizes),
                       default_size=d.size, default_steps=d.steps, default_guidance_scale=d.guidance,
                       max_steps=card.max_steps)
