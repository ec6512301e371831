"""Streaming and edits through the `openai` client against a server process: OpenAI's event types in order,
the completed image equal to the unstreamed one, edits with and without a mask on rf-shapes and on a tiny
InstaFlow-layout checkpoint, a client leaving mid-stream, and every bad upload refused with a 400 (or 413)
that names the field before anything is queued."""
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.photo import photo_like
from tests.server.serving import ServerProcess, decode_png, openai_client

pytestmark = pytest.mark.slow

MULTI = "rf-shapes-2rf"            # 16 steps with CFG and the count guide
ONE_STEP = "rf-shapes"
TINY = "instaflow-2rf"
MAX_PIXELS = 128 * 128
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def server(tiny_sd):
    srv = ServerProcess("--model", MULTI, "--model", ONE_STEP, "--model", f"{TINY}={tiny_sd}",
                        "--max-input-pixels", str(MAX_PIXELS), "--max-body-bytes", str(MAX_BODY),
                        ready_timeout=240)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def size_of(server, model: str) -> tuple[int, int]:
    (card,) = [m for m in httpx.get(f"{server.url}/v1/models").json()["data"] if m["id"] == model]
    w, h = card["default_size"].split("x")
    return int(w), int(h)


@pytest.mark.parametrize("partial_images", [0, 1, 2, 3])
def test_stream_sends_the_previews_then_the_unstreamed_image(client, partial_images):
    kw = dict(model=MULTI, prompt="a red circle", extra_body={"seed": 11, "num_inference_steps": 8})
    plain = client.images.generate(**kw).data[0].b64_json
    events = list(client.images.generate(**kw, stream=True, partial_images=partial_images))
    assert [e.type for e in events] == ["image_generation.partial_image"] * partial_images + \
        ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(partial_images))
    assert events[-1].b64_json == plain
    assert events[-1].usage.input_tokens > 0 and events[-1].size == "64x64"
    ours = events[-1].to_dict()                                    # our extensions, as a JSON answer has them
    assert ours["seed"] == 11 and {"queue", "sample", "decode", "total"} <= set(ours["timings"])
    for e in events[:-1]:
        assert decode_png(e.b64_json).shape == decode_png(plain).shape


def test_a_one_step_model_streams_no_previews(client):
    events = list(client.images.generate(model=ONE_STEP, prompt="a blue square", stream=True, partial_images=3))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_streaming_more_than_one_image_is_refused_naming_n(server):
    r = httpx.post(f"{server.url}/v1/images/generations",
                   json={"model": MULTI, "prompt": "x", "n": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_a_client_leaving_mid_stream_drops_its_row(server):
    before = server.metric("rfserve_jobs_dropped_total", model=MULTI, reason="client_gone")
    body = {"model": MULTI, "prompt": "a long one", "stream": True, "partial_images": 3, "num_inference_steps": 50}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break                                    # one preview, then leave
    deadline = time.monotonic() + 30
    while server.metric("rfserve_jobs_dropped_total", model=MULTI, reason="client_gone") == before:
        assert time.monotonic() < deadline, "the stream's row was never dropped"
        time.sleep(0.2)


@pytest.mark.parametrize("model", [MULTI, TINY])
def test_edit_at_strength_one_is_text_to_image(server, client, model):
    w, h = size_of(server, model)
    extra = {"seed": 4, "num_inference_steps": 4}
    t2i = client.images.generate(model=model, prompt="a green star", extra_body=extra).data[0].b64_json
    edit = client.images.edit(model=model, prompt="a green star", image=("in.png", png(photo_like(h, w, 1))),
                              extra_body={**extra, "strength": 1.0})
    assert edit.data[0].b64_json == t2i


@pytest.mark.parametrize("model", [MULTI, TINY])
def test_an_edit_with_a_mask_keeps_the_rest_of_the_input(server, client, model):
    w, h = size_of(server, model)
    image = photo_like(h, w, 2)
    mask = np.full((h, w, 4), 255, np.uint8)
    mask[: h // 2, :, 3] = 0                                     # transparent top half: change it
    out = decode_png(client.images.edit(model=model, prompt="a red circle", image=("in.png", png(image)),
                                        mask=("mask.png", png(mask)),
                                        extra_body={"seed": 3, "strength": 0.9}).data[0].b64_json)
    assert np.array_equal(out[h // 2:], image[h // 2:])
    assert not np.array_equal(out[: h // 2], image[: h // 2])


def test_an_edit_streams_its_previews(server, client):
    w, h = size_of(server, MULTI)
    events = list(client.images.edit(model=MULTI, prompt="a red circle", image=("in.png", png(photo_like(h, w, 3))),
                                     stream=True, partial_images=2,
                                     extra_body={"seed": 1, "strength": 1.0, "num_inference_steps": 8}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]


def test_the_model_list_says_what_each_model_takes(server):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {m["id"]: (m["edits"], m["chat"]) for m in models} == {MULTI: (True, False), ONE_STEP: (True, False),
                                                                  TINY: (True, False)}


def _edit(server, files, **fields):
    data = {"model": MULTI, "prompt": "a red circle", **fields}
    return httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=30)


def _bad_uploads(w, h):
    image = ("image", ("in.png", png(photo_like(h, w, 0)), "image/png"))
    opaque = png(np.full((h, w, 3), 255, np.uint8))
    small = png(np.zeros((h // 2, w // 2, 4), np.uint8))
    return [
        ([("image", ("in.txt", b"not an image at all", "text/plain"))], {}, "image", "cannot be decoded"),
        ([("image", ("in.png", png(photo_like(h, w, 0))[:60], "image/png"))], {}, "image", "cannot be decoded"),
        ([image, ("mask", ("m.png", small, "image/png"))], {}, "mask", "differs"),
        ([image, ("mask", ("m.png", opaque, "image/png"))], {}, "mask", "no alpha"),
        ([image, image], {}, "image", "at most 1"),
        ([("image", ("big.png", png(np.zeros((200, 200, 3), np.uint8)), "image/png"))], {}, "image", "too large"),
        ([image], {"strength": "1.5"}, "strength", "finite number between 0 and 1"),
        ([], {}, "image", "missing"),
        ([image], {"model": ONE_STEP, "n": "2", "stream": "true"}, "n", "streaming"),
    ]


def test_bad_uploads_are_refused_naming_the_field_and_never_queued(server):
    w, h = size_of(server, MULTI)
    before = server.metric("rfserve_batch_size_count")
    for files, fields, param, words in _bad_uploads(w, h):
        r = _edit(server, files, **fields)
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"].lower(), (param, err)
    assert server.metric("rfserve_batch_size_count") == before


def test_an_edit_over_the_body_limit_is_413(server):
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    r = _edit(server, [("image", ("big.png", png(noise), "image/png"))])
    assert r.status_code == 413


def test_a_model_that_cannot_edit_is_named(tmp_path_factory):
    from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint

    folder = save_random_checkpoint(tmp_path_factory.mktemp("tiny-janus"), "tiny", seed=0)
    srv = ServerProcess("--model", f"janusflow-1.3b={folder}", ready_timeout=240)
    try:
        models = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert [(m["edits"], m["chat"]) for m in models] == [(False, True)]
        r = httpx.post(f"{srv.url}/v1/images/edits", data={"prompt": "x"},
                       files={"image": ("in.png", png(photo_like(16, 16, 0)), "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    finally:
        srv.stop()


def test_the_streamed_image_decodes_as_its_output_format(client):
    (event,) = list(client.images.generate(model=ONE_STEP, prompt="x", stream=True, output_format="jpeg",
                                           output_compression=80))
    assert event.output_format == "jpeg" and base64.b64decode(event.b64_json)[:2] == b"\xff\xd8"
