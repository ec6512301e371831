"""OpenAI's output fields: `output_format`, `output_compression`, `background` and `quality`, through the
official client against the default server, as `b64_json` and as `url`."""
import base64
import io

import httpx
import numpy as np
import pytest
from openai import BadRequestError
from PIL import Image

from rfserve.model_zoo.base import ImageDefaults, ModelCard
from rfserve.server.specs import image_specs
from tests.server.serving import ServerProcess, openai_client

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess()
    yield srv
    srv.stop()


def pixels(data: bytes, fmt: str) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == PIL_FORMATS[fmt]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(PIL_FORMATS))
def test_every_format_round_trips_as_b64_json_and_url(server, fmt):
    client = openai_client(server)
    prompt, seed = "two red circles on a blue background", 3
    reference = client.images.generate(prompt=prompt, extra_body={"seed": seed})          # PNG: lossless
    want = pixels(base64.b64decode(reference.data[0].b64_json), "png")
    resp = client.images.generate(prompt=prompt, output_format=fmt, output_compression=95, quality="high",
                                  background="opaque", extra_body={"seed": seed})
    assert (resp.output_format, resp.quality, resp.size, resp.background) == (fmt, "high", "64x64", "opaque")
    got = pixels(base64.b64decode(resp.data[0].b64_json), fmt)
    assert np.abs(got - want).mean() < (0.01 if fmt == "png" else 6)             # lossy at quality 95
    by_url = client.images.generate(prompt=prompt, output_format=fmt, response_format="url", extra_body={"seed": seed})
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.headers["content-type"] == f"image/{fmt}"
    pixels(fetched.content, fmt)


@pytest.mark.slow
def test_compression_trades_size_for_quality_and_transparent_is_refused(server):
    client = openai_client(server)
    sizes = [len(base64.b64decode(client.images.generate(
        prompt="a green triangle", output_format="jpeg", output_compression=q, extra_body={"seed": 1}).data[0].b64_json))
        for q in (10, 95)]
    assert sizes[0] < sizes[1]
    with pytest.raises(BadRequestError) as err:
        client.images.generate(prompt="a green triangle", background="transparent")
    body = err.value.body
    assert body["param"] == "background" and "transparent backgrounds are not supported" in body["message"]


def test_quality_picks_steps_for_multi_step_models_only():
    multi = ModelCard("m", "instaflow", ImageDefaults(steps=8, guidance=2.0, size="64x64"), ("64x64",), max_steps=10)
    one = ModelCard("o", "instaflow", ImageDefaults(steps=1, guidance=0.0, size="64x64"), ("64x64",))
    steps = {q: image_specs(multi, "x", max_n=1, quality=q)[0].steps
             for q in ("auto", "low", "medium", "standard", "high", "hd")}
    assert steps == {"auto": 8, "low": 4, "medium": 8, "standard": 8, "high": 10, "hd": 10}   # 12, capped at 10
    assert {image_specs(one, "x", max_n=1, quality=q)[0].steps for q in ("low", "high")} == {1}
    assert image_specs(multi, "x", max_n=1, quality="low", steps=7)[0].steps == 7          # an explicit count wins
