"""`POST /v1/chat/completions` for the models that chat: validation, the continuous batcher, SSE.

Text answers come from the model's `ContinuousBatcher`, which the engine owns (one per served
chat model, started on first use). With `modalities: ["image"]` the last user message's text becomes a
text-to-image request on the ordinary image queue, and the answer carries the PNG as an
`image_url` content part (a data: URL).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from rfserve.server.chat.batcher import ChatClosed, ChatEvent, ChatQueueFull, ChatSequence
from rfserve.server.chat.config import ChatConfig
from rfserve.server.chat.messages import Conversation, check_remote, decode_data_url, parse_conversation
from rfserve.server.chat.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                         Choice, ChunkChoice, Delta, ImageContent, ImageOptions, ImageURL, Usage)
from rfserve.server import faults, jobs, streaming
from rfserve.server.encoding import encode_all
from rfserve.server.errors import APIError, Code, documented, model_not_found, shutting_down
from rfserve.server.scheduler import JobResult
from rfserve.server.specs import image_specs
from rfserve.server.uploads import open_image


def _chat_model(engine, name: str | None):
    """(name, chat parts) of the named chat model; the first served chat model when `name` is None."""
    jobs.check_admitting(engine)
    chat = [n for n, m in engine.models.items() if m.chat is not None]
    if name is None:
        if not chat:
            raise APIError(Code.MODEL_NOT_FOUND, "no served model supports chat", param="model")
        name = chat[0]
    model = engine.models.get(name)
    if model is None:
        raise model_not_found(name, engine.models)
    if name not in chat:
        raise APIError(Code.UNSUPPORTED_MODEL, f"model {name!r} does not support chat; chat models served: {chat}",
                       param="model")
    return name, model.chat


def chat_router(engine) -> APIRouter:
    router = APIRouter()
    cfg = engine.config.chat

    @router.post("/v1/chat/completions", response_model=ChatCompletion,
                 responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                  "description": "JSON, or with `stream` server-sent events ending in [DONE]"},
                            **documented(400, 404, 413, 429, 499, 500, 503, 504, 507)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        name, parts = _chat_model(engine, body.model)
        proc = parts.processor
        conv = parse_conversation(body.messages, proc, cfg)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.modalities and "image" in body.modalities:
            return await _image_answer(engine, name, conv, body, request, rid, created)
        images = [await _load_image(field, url, cfg) for field, url in conv.image_urls]
        prompt = proc.prompt(conv.turns, conv.system, images)
        max_tokens = _budget(len(prompt.ids), body, engine.chat_max_len(name), cfg.default_max_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue[ChatEvent]()
        seq = ChatSequence(prompt.ids, prompt.pixel_values, prompt.image_positions, max_tokens, body.temperature,
                           body.top_p, body.stops, body.seed, emit=_bridge(loop, events),
                           fault=faults.find(conv.last_user_text) if engine.config.fault_injection else None)
        try:
            engine.chat_batcher(name).submit(seq)
        except ChatQueueFull:
            raise APIError(Code.QUEUE_FULL, f"the chat queue for {name} is full; retry shortly",
                           headers={"Retry-After": "1"}) from None
        except ChatClosed:
            raise shutting_down() from None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(seq, events, rid, created, name, usage), media_type="text/event-stream")
        return await _collect(seq, events, request, rid, created, name, body.seed)

    return router


def _budget(prompt_len: int, body: ChatCompletionRequest, max_len: int, default: int) -> int:
    if prompt_len >= max_len:
        raise APIError(Code.CONTEXT_LENGTH_EXCEEDED, f"the prompt is {prompt_len} tokens (images count as their "
                                                     f"tokens); the model's context is {max_len}", param="messages")
    asked = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if asked is not None and prompt_len + asked > max_len:
        raise APIError(Code.CONTEXT_LENGTH_EXCEEDED, f"{field} = {asked} plus the prompt's {prompt_len} tokens "
                                                     f"exceeds the model's context of {max_len}", param=field)
    return asked or min(default, max_len - prompt_len)


async def _load_image(field: str, url: str, cfg: ChatConfig):
    if url.startswith("data:"):
        raw = decode_data_url(url, field)
    else:
        check_remote(url, field, cfg)
        raw = await _fetch(url, field, cfg.max_image_bytes)
    image = await asyncio.to_thread(open_image, raw, field, max_bytes=cfg.max_image_bytes,
                                    max_pixels=cfg.max_image_pixels)
    return image.convert("RGB")


async def _fetch(url: str, field: str, limit: int) -> bytes:
    try:
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise APIError(Code.INVALID_IMAGE_URL, f"{field}: fetching the image returned HTTP "
                                                           f"{resp.status_code}", param=field)
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise APIError(Code.INVALID_IMAGE, f"{field}: image too large (over {limit} bytes)",
                                       param=field)
                return bytes(data)
    except httpx.HTTPError as err:
        raise APIError(Code.INVALID_IMAGE_URL, f"{field}: the image could not be fetched: {type(err).__name__}",
                       param=field) from None


def _bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """Deliver batcher-thread events to the request's event loop."""
    def emit(event: ChatEvent) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:      # the loop is gone (server stopping); nobody is listening
            pass
    return emit


def _usage(event: ChatEvent) -> Usage:
    return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                 total_tokens=event.prompt_tokens + event.completion_tokens)


async def _collect(seq, events, request, rid, created, name, seed) -> ChatCompletion:
    text = []
    gone = asyncio.ensure_future(jobs.disconnected(request))
    try:
        while True:
            nxt = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                seq.cancel()
                raise APIError(Code.CLIENT_CLOSED, "client closed the request")
            event = nxt.result()
            if event.out_of_memory:
                raise APIError(Code.OUT_OF_MEMORY, event.error)
            if event.error:
                raise APIError(Code.GENERATION_FAILED, f"generation failed: {event.error}")
            text.append(event.delta)
            if event.finish_reason:
                break
    finally:
        gone.cancel()
    return ChatCompletion(id=rid, created=created, model=name, usage=_usage(event), seed=seed,
                          choices=[Choice(message=AssistantMessage(content="".join(text)),
                                          finish_reason=event.finish_reason)])


async def _sse(seq, events, rid, created, name, include_usage):
    """Role chunk, content chunks, a finish chunk, optionally a usage chunk, then [DONE].
    Leaving this generator early (client gone) cancels the sequence and frees its slot."""
    def chunk(delta: Delta, finish=None, usage=None, choices=True) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=name, usage=usage,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            event = await events.get()
            if event.error:
                error = {"message": f"generation failed: {event.error}", "type": "server_error",
                         "code": Code.OUT_OF_MEMORY if event.out_of_memory else Code.GENERATION_FAILED}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event.delta:
                yield chunk(Delta(content=event.delta))
            if event.finish_reason:
                yield chunk(Delta(), finish=event.finish_reason)
                if include_usage:
                    yield chunk(Delta(), usage=_usage(event), choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        seq.cancel()              # a no-op once finished; frees the slot if the client left


async def _image_answer(engine, name, conv: Conversation, body, request, rid, created):
    """`modalities: ["image"]`: text-to-image from the last user message's text. Streamed, the
    previews come first, each an image chunk with its `partial_image_index`, then the image and [DONE]."""
    if conv.image_urls:
        raise APIError(Code.INVALID_VALUE, "image generation takes text only; remove the image parts",
                       param="messages")
    opts = body.image or ImageOptions()
    specs = image_specs(engine.models[name].card, conv.last_user_text, max_n=1, size=opts.size,
                        steps=opts.num_inference_steps, guidance=opts.guidance_scale, seed=body.seed, prefix="image.")
    if body.stream:
        previews: asyncio.Queue = asyncio.Queue()
        job = jobs.submit(engine, name, specs, partial_images=opts.partial_images,
                          on_partial=streaming.previews_to(asyncio.get_running_loop(), previews))
        return StreamingResponse(_image_chunks(job, previews, rid, created, name), media_type="text/event-stream")
    images = (await jobs.wait(jobs.submit(engine, name, specs), request)).images
    prompt_tokens = engine.models[name].pipeline.prompt_tokens(conv.last_user_text)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)
    return ChatCompletion(id=rid, created=created, model=name, usage=usage, seed=specs[0].seed,
                          choices=[Choice(message=AssistantMessage(content=[await _png_part(images[0])]),
                                          finish_reason="stop")])


async def _png_part(image, partial_index: int | None = None) -> ImageContent:
    (b64,) = await encode_all([image], as_base64=True)
    return ImageContent(image_url=ImageURL(url=f"data:image/png;base64,{b64.decode()}"),
                        partial_image_index=partial_index)


async def _image_chunks(job, previews, rid, created, name):
    def chunk(delta: Delta, finish=None) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=name,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)])
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    yield chunk(Delta(role="assistant", content=""))
    try:
        async for item in streaming.progress(job, previews):
            if isinstance(item, JobResult):
                yield chunk(Delta(content=[await _png_part(item.images[0])]), finish="stop")
            else:
                yield chunk(Delta(content=[await _png_part(item[1], partial_index=item[0])]))
    except APIError as err:
        yield f"data: {streaming.error_event(err)}\n\n"
    yield "data: [DONE]\n\n"
