"""The HTTP gateway: validates, queues, awaits the worker, encodes off the loop."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from rfserve.model_zoo.base import ImageSpec, ModelCard
from rfserve import __version__
from rfserve.server import contract, edits, jobs, streaming
from rfserve.server.chat.routes import chat_router
from rfserve.server.encoding import MEDIA_TYPES, encode_all
from rfserve.server.engine import Engine
from rfserve.server.errors import (APIError, Code, api_error_handler, documented, http_error_handler, model_not_found,
                                   validation_handler)
from rfserve.server.image_store import ImageStore
from rfserve.server.limits import BodyLimitMiddleware
from rfserve.server.playground import playground_router
from rfserve.server.ranges import range_error
from rfserve.server.adapters import Adapter
from rfserve.server.schemas import (Health, ImageData, ImageGenerationRequest, ImageOptions, ImagesResponse,
                                    LoraDeleted, LoraList, LoraLoadRequest, LoraObject, ModelList, ModelObject,
                                    Readiness)
from rfserve.server.security import APIKeyMiddleware
from rfserve.server.specs import image_specs
from rfserve.server.vocabulary import prompt_warnings, vocabulary_object

log = logging.getLogger("rfserve.api")

STARTED = int(time.time())


# The routes beside `/v1/images/{image_id}`. An id never takes their names: a GET there would otherwise reach
# `get_image` and be a 404 for an image of that name, not a 405 with `Allow: POST` as any other wrong method.
# OpenAPI matches concrete paths before templated ones, so the document already says so.
IMAGE_ACTIONS = ("generations", "edits")


class ImageIdConvertor(StringConvertor):
    regex = f"(?!(?:{'|'.join(IMAGE_ACTIONS)})$)[^/]+"


register_url_convertor("image_id", ImageIdConvertor())


def stream_doc(kind: str) -> dict:
    """The 200 of an image route: JSON, or with `stream` events (the schema describes one event)."""
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "enum": [f"{kind}.partial_image", f"{kind}.completed", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"}}}
    return {"content": {"text/event-stream": {"schema": event}},
            "description": f"JSON, or with `stream` server-sent events: `partial_images` {kind}.partial_image "
                           f"previews, then one {kind}.completed (or an error event)"}


def create_app(engine: Engine) -> FastAPI:
    config = engine.config
    app = FastAPI(title="rfserve", version=__version__, summary="OpenAI-compatible rectified-flow image server")
    app.state.engine = engine
    store = ImageStore(config.image_store_items, config.image_store_ttl_s)
    metrics = engine.metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=config.api_keys, protect_metrics=config.protect_metrics)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"])
    app.exception_handler(RequestValidationError)(validation_handler)
    app.exception_handler(APIError)(api_error_handler)
    app.exception_handler(StarletteHTTPException)(http_error_handler)

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={200: stream_doc("image_generation"),
                         **documented(400, 404, 413, 429, 499, 500, 503, 504, 507)})
    async def generate_images(body: ImageGenerationRequest, request: Request):
        name = _model_name(body.model)
        with counted(name):
            card = _card(name)
            specs = image_specs(card, body.prompt, max_n=config.max_images_per_request, n=body.n, size=body.size,
                                steps=body.num_inference_steps, guidance=body.guidance_scale, seed=body.seed,
                                negative_prompt=body.negative_prompt, quality=body.quality)
            return await answer(name, specs, body, request, "image_generation")

    @app.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              openapi_extra=edits.OPENAPI_BODY,
              responses={200: stream_doc("image_edit"), **documented(400, 404, 413, 429, 499, 500, 503, 504, 507)})
    async def edit_images(request: Request):
        """OpenAI's image edit, multipart (server/edits.py): the flow run from the input, a mask keeping the rest."""
        body, image, change = await edits.read_edit(request, config)
        name = _model_name(body.model)
        with counted(name):
            card = _card(name)
            specs = edits.edit_specs(card, body, image, change, config.max_images_per_request)
            return await answer(name, specs, body, request, "image_edit")

    def _model_name(model: str | None) -> str:
        return model if model is not None else (engine.specs[0].name if engine.specs else "")

    def _card(name: str) -> ModelCard:
        jobs.check_admitting(engine)
        card = engine.cards.get(name)
        if card is None:
            raise model_not_found(name, engine.cards)
        return card

    @contextmanager
    def counted(name: str) -> Iterator[None]:
        """A refused request is counted under its status (and an unknown model under "unknown")."""
        try:
            yield
        except APIError as err:
            metrics.requests.labels(name if name in engine.cards else "unknown", str(err.status)).inc()
            raise

    async def answer(name: str, specs: list[ImageSpec], body: ImageOptions, request: Request, kind: str):
        """Queue the specs and answer: JSON with every image, or with `stream` the events of server/streaming.py."""
        start = time.perf_counter()
        if body.timeout is not None:
            why = range_error(body.timeout, 0, config.max_request_timeout_s, above=True)
            if why is not None:
                raise APIError(Code.INVALID_VALUE, f"timeout: {why} (seconds)", param="timeout")
        if body.stream and body.n > 1:
            raise APIError(Code.INVALID_VALUE, "n must be 1 when streaming: the events carry no image index", param="n")
        lora = engine.adapters.choice(name, body.lora)
        specs = [replace(s, lora=lora) for s in specs]
        if config.log_prompts:
            log.info("request model=%s seed=%d prompt=%r", name, specs[0].seed, specs[0].prompt)
        size = f"{specs[0].width}x{specs[0].height}"
        warnings = prompt_warnings(engine.cards[name], specs[0].prompt)
        jpeg = body.output_compression if body.output_format == "jpeg" else None
        if body.stream:
            previews: asyncio.Queue = asyncio.Queue()
            job = jobs.submit(engine, name, specs, timeout_s=body.timeout, device_jpeg=jpeg,
                              partial_images=body.partial_images,
                              on_partial=streaming.previews_to(asyncio.get_running_loop(), previews))
            fmt = streaming.StreamFormat(kind, body.output_format, body.output_compression, body.quality, size,
                                         "opaque")
            used = streaming.usage(engine.models[name].pipeline.prompt_tokens(specs[0].prompt))

            def finished(status: int) -> None:
                metrics.requests.labels(name, str(status)).inc()
                if status == 200:
                    metrics.images.labels(name).inc()
                    metrics.request_seconds.labels(name).observe(time.perf_counter() - start)

            return StreamingResponse(streaming.events(job, previews, fmt, used, finished, start, warnings),
                                     media_type="text/event-stream")
        job = jobs.submit(engine, name, specs, timeout_s=body.timeout, device_jpeg=jpeg)
        result = await jobs.wait(job, request)
        images = await encode_all(result.images, as_base64=body.response_format == "b64_json",
                                  fmt=body.output_format, quality=body.output_compression, encoded=result.encoded)
        prompt = specs[0].prompt
        revised = engine.models[name].pipeline.kept_prompt(prompt) if result.prompt_truncated else None
        data = []
        if body.response_format == "url":
            media = MEDIA_TYPES[body.output_format]
            data = [ImageData(url=f"{request.base_url}v1/images/{store.put(image, media)}", revised_prompt=revised)
                    for image in images]
        timings = {k: round(v * 1000, 3) for k, v in result.timings.items()}
        timings["total"] = round((time.perf_counter() - start) * 1000, 3)
        metrics.requests.labels(name, "200").inc()
        metrics.images.labels(name).inc(len(images))
        metrics.request_seconds.labels(name).observe(time.perf_counter() - start)
        response = ImagesResponse(created=int(time.time()), data=data, output_format=body.output_format,
                                  quality=body.quality, size=size, model=name, seed=specs[0].seed,
                                  prompt_truncated=result.prompt_truncated, timings=timings, warnings=warnings)
        if body.response_format == "url":
            return response
        return Response(images_json(response, images, revised), media_type="application/json")

    @app.get("/v1/images/{image_id:image_id}", response_class=Response, responses={
        200: {"content": {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()},
              "description": "a `url` result in its `output_format`, kept for an hour"}, **documented(404)})
    async def get_image(image_id: str):
        found = store.get(image_id)
        if found is None:
            raise APIError(Code.IMAGE_NOT_FOUND, f"image {image_id!r} not found or expired", param="image_id")
        data, media = found
        return Response(data, media_type=media)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        served = engine.adapters.pipelines
        return ModelList(data=[_model_object(m.card, chats=m.chat is not None,
                                             loras=[a.name for a in engine.adapters.listing(name)]
                                             if name in served else None)
                               for name, m in engine.models.items()])

    @app.get("/v1/loras", response_model=LoraList)
    async def list_loras():
        """The LoRA adapters loaded, for every model (requests name them in `lora`)."""
        return LoraList(data=[_lora_object(a) for a in engine.adapters.listing()])

    if config.lora.on:            # else POST and DELETE are a 405 and a 404, as the document says
        @app.post("/v1/loras", response_model=LoraObject, responses=documented(400, 404, 409, 503))
        async def load_lora(body: LoraLoadRequest):
            """Load a LoRA adapter (a .safetensors file, a folder holding one, or a hub id) for a model; requests
            may name it once this answers. Key-protected like every /v1 route when the server has keys."""
            jobs.check_admitting(engine)
            model = engine.adapters.model_for(body.model, engine.cards)
            adapter = await asyncio.to_thread(engine.adapters.load, body.name, body.path, model, trusted=False)
            contract.forget(app)
            return _lora_object(adapter)

        @app.delete("/v1/loras/{name}", response_model=LoraDeleted, responses=documented(404))
        async def unload_lora(name: str):
            """New requests are refused the adapter at once; it leaves the device once no request uses it."""
            adapter = await asyncio.to_thread(engine.adapters.remove, name)
            contract.forget(app)
            return LoraDeleted(id=adapter.name)

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


def images_json(response: ImagesResponse, b64: list[bytes], revised_prompt: str | None) -> bytes:
    """`response` as JSON with `data` holding the base64 images, each copied once, into the body: base64 needs
    no JSON escaping, while a pydantic round trip would copy every image's text several times (about 0.4 ms
    per 512² PNG)."""
    rest = response.model_dump_json(exclude_none=True, exclude={"data"}).encode()            # {"created":...}
    tail = b'"}' if revised_prompt is None else b'","revised_prompt":' + json.dumps(revised_prompt).encode() + b"}"
    parts = [b'{"data":[']
    for i, data in enumerate(b64):
        parts += [b',{"b64_json":"' if i else b'{"b64_json":"', data, tail]
    parts += [b"],", rest[1:]]
    return b"".join(parts)


def _model_object(card: ModelCard, chats: bool, loras: list[str] | None) -> ModelObject:
    d = card.defaults
    return ModelObject(id=card.name, created=STARTED, family=card.family, sizes=list(card.sizes),
                       default_size=d.size, default_steps=d.steps, default_guidance_scale=d.guidance,
                       max_steps=card.max_steps, edits=card.supports_edits, chat=chats,
                       vocabulary=vocabulary_object(card), loras=loras)


def _lora_object(adapter: Adapter) -> LoraObject:
    return LoraObject(id=adapter.name, model=adapter.model, source=adapter.source, rank=adapter.rank,
                      components=adapter.components, created=adapter.created)
