"""Hunyuan-DiT end to end: a `rfserve serve` subprocess on the tiny checkpoint, driven through
the official `openai` client."""

import httpx
import numpy as np
import openai
import pytest

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
from tests.server.serving import ServerProcess, decode_png, openai_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_hunyuan):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")        # see conftest: one thread is faster here
        srv = ServerProcess("--model", f"hunyuan-dit-v1.2={tiny_hunyuan}", "--max-batch", "4",
                            "--max-wait-ms", "20")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)



def test_served_images_match_the_in_process_pipeline(client, tiny_hunyuan):
    resp = client.images.generate(model="hunyuan-dit-v1.2", prompt="a red circle", n=2, size="160x96",
                                  response_format="b64_json", extra_body={"seed": 42, "num_inference_steps": 3})
    assert resp.seed == 42 and len(resp.data) == 2
    served = [decode_png(d.b64_json) for d in resp.data]
    specs = [ImageSpec("a red circle", "", s, 160, 96, 3, 5.0) for s in (42, 43)]
    local = HunyuanPipeline.from_pretrained(tiny_hunyuan).run(specs).images
    for got, want in zip(served, local):
        assert got.shape == (96, 160, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(served[0].astype(int) - served[1].astype(int)).max() > 0


def test_unsupported_size_is_a_400_listing_the_sizes(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="hunyuan-dit-v1.2", prompt="x", size="512x512")
    message = str(err.value)
    assert "size" in message and "160x96" in message and "112x144" in message


def test_over_long_prompt_is_flagged_with_its_kept_part(client):
    resp = client.images.generate(model="hunyuan-dit-v1.2", prompt="blue " * 120, size="128x128",
                                  extra_body={"seed": 3, "num_inference_steps": 1})
    assert resp.prompt_truncated is True
    assert 0 < len(resp.data[0].revised_prompt) < len("blue " * 120)


def test_model_listing(server):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["family"], len(m["sizes"])) for m in models] == [("hunyuan-dit-v1.2", "hunyuan-dit", 10)]
