"""The chat route end to end against a server process: the `openai` client, SSE, the image
extension and the 4xx answers for bad input."""
import base64
import io
import json

import httpx
import numpy as np
import pytest
from openai import BadRequestError
from PIL import Image

from tests.server.serving import ServerProcess, openai_client

pytestmark = pytest.mark.slow
MODEL = "janusflow-1.3b"


@pytest.fixture(scope="module")
def server(tiny_janus):
    srv = ServerProcess("--model", f"{MODEL}={tiny_janus}", "--max-batch", "4", "--device", "cpu")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def data_url(img: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8))


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.smoke
def test_stream_and_non_stream_give_the_same_text(client):
    messages = user({"type": "image_url", "image_url": {"url": data_url(picture())}},
                    {"type": "text", "text": "describe the image"})
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 16 and 0 < full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, messages=user({"type": "text", "text": "write a short poem"}), temperature=1.0,
              top_p=0.9, max_tokens=8, seed=123)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_image_modality_returns_an_image_part(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a red cat"}], "modalities": ["image"],
            "seed": 4, "image": {"num_inference_steps": 3}}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    (part,) = resp.json()["choices"][0]["message"]["content"]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert png.size == (16, 16)
    images = httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={
        "model": MODEL, "prompt": "a red cat", "seed": 4, "num_inference_steps": 3}).json()
    assert images["data"][0]["b64_json"] == part["image_url"]["url"].split(",", 1)[1]


def huge_png() -> str:
    return data_url(Image.new("L", (5000, 4000)))


@pytest.mark.parametrize("messages, param, words", [
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), "messages", "no text"),
    (user(*[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 5,
          {"type": "text", "text": "x"}), "messages[0].content[4].image_url.url", "too many images"),
    (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
          {"type": "text", "text": "x"}), "messages[0].content[0].image_url.url", "cannot be decoded"),
    ("huge", "messages[0].content[0].image_url.url", "image too large"),
    (user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
          {"type": "text", "text": "x"}), "messages[0].content[0].image_url.url", "remote image urls are disabled"),
    ([{"role": "user", "content": "hello " * 400}], "messages", "context"),
    ([{"role": "user", "content": "hi <image_placeholder>"}], "messages[0].content[0].text", "reserved token"),
    ([{"role": "assistant", "content": "hi"}], "messages[0].role", "must be 'user'"),
])
def test_bad_input_is_a_400_naming_the_field(server, messages, param, words):
    if messages == "huge":
        messages = user({"type": "image_url", "image_url": {"url": huge_png()}}, {"type": "text", "text": "x"})
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"].lower()


def test_max_tokens_over_the_context_is_rejected(client):
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert "max_tokens" in str(info.value)


def test_a_streamed_image_answer_sends_previews_then_the_image(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a red cat"}], "modalities": ["image"],
            "seed": 4, "stream": True, "image": {"num_inference_steps": 6, "partial_images": 2}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert chunks[0]["delta"]["role"] == "assistant"
    parts = [c["delta"]["content"][0] for c in chunks[1:]]
    assert [p.get("partial_image_index") for p in parts] == [0, 1, None]
    assert [c.get("finish_reason") for c in chunks[1:]] == [None, None, "stop"]
    unstreamed = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        **body, "stream": False}).json()["choices"][0]["message"]["content"][0]
    assert parts[-1]["image_url"]["url"] == unstreamed["image_url"]["url"]
