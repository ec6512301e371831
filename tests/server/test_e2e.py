"""End to end against a real server process, through the official `openai` client."""
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.server.config import ServerConfig
from tests.server.serving import ServerProcess, decode_png, openai_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--model", f"perflow-sd15={tiny_sd}",
                        "--max-batch", "8", "--max-wait-ms", "20", "--enable-fault-injection")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)



def test_b64_json_matches_in_process_pipeline_for_the_same_seed(client, tiny_sd):
    resp = client.images.generate(model="instaflow-2rf", prompt="a red circle", n=2, size="16x16",
                                  response_format="b64_json", extra_body={"seed": 42, "num_inference_steps": 2})
    assert resp.seed == 42 and len(resp.data) == 2
    served = [decode_png(d.b64_json) for d in resp.data]
    pipe = InstaFlowPipeline.from_pretrained(tiny_sd)
    local = pipe.generate(["a red circle"] * 2, [42, 43], steps=2, guidance=1.5,
                          negative_prompts=["painting, unreal, twisted"] * 2)
    for got, want in zip(served, local):
        assert got.shape == (16, 16, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(served[0].astype(int) - served[1].astype(int)).max() > 0


def test_url_results_are_served(client):
    resp = client.images.generate(model="perflow-sd15", prompt="a dog", size="32x16", response_format="url",
                                  extra_body={"seed": 1})
    png = httpx.get(resp.data[0].url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 16)
    missing = httpx.get(resp.data[0].url.rsplit("/", 1)[0] + "/deadbeef")
    assert missing.status_code == 404


def test_random_seed_is_reported(client):
    a = client.images.generate(model="instaflow-2rf", prompt="x", size="16x16", extra_body={"num_inference_steps": 1})
    b = client.images.generate(model="instaflow-2rf", prompt="x", size="16x16", extra_body={"num_inference_steps": 1})
    assert isinstance(a.seed, int) and a.seed != b.seed


def test_over_long_prompt_is_truncated_and_reported(client):
    resp = client.images.generate(model="instaflow-2rf", prompt="blue " * 300, size="16x16",
                                  extra_body={"seed": 3, "num_inference_steps": 1})
    assert resp.prompt_truncated is True
    assert 0 < len(resp.data[0].revised_prompt) < len("blue " * 300)


def test_models_health_ready_metrics(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"instaflow-2rf", "perflow-sd15"}
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("rfserve_requests_total", "rfserve_queue_depth", "rfserve_batch_size_bucket",
                 "rfserve_stage_seconds_bucket", "rfserve_request_seconds_bucket"):
        assert name in text


@pytest.mark.parametrize("body,param,status", [
    ({"model": "nope", "prompt": "x"}, "model", 404),
    ({"model": "perflow-sd15", "prompt": "x", "size": "512x512"}, "size", 400),
    ({"model": "perflow-sd15", "prompt": "x", "n": 0}, "n", 400),
    ({"model": "perflow-sd15", "prompt": "x", "n": 11}, "n", 400),
    ({"model": "perflow-sd15", "prompt": "x", "num_inference_steps": 0}, "num_inference_steps", 400),
    ({"model": "perflow-sd15", "prompt": "x", "num_inference_steps": 1000}, "num_inference_steps", 400),
    ({"model": "perflow-sd15", "prompt": "x", "guidance_scale": -1}, "guidance_scale", 400),
    ({"model": "perflow-sd15", "prompt": "x", "guidance_scale": 1e9}, "guidance_scale", 400),
    ({"model": "perflow-sd15", "prompt": ""}, "prompt", 400),
    ({"model": "perflow-sd15"}, "prompt", 400),
    ({"model": "perflow-sd15", "prompt": 5}, "prompt", 400),
    ({"model": "perflow-sd15", "prompt": "x", "n": "2"}, "n", 400),
    ({"model": "perflow-sd15", "prompt": "x", "seed": -1}, "seed", 400),
    ({"model": "perflow-sd15", "prompt": "x", "response_format": "png"}, "response_format", 400),
    ({"model": "perflow-sd15", "prompt": "x", "colour": "red"}, "colour", 400),
])
def test_bad_input_gets_4xx_naming_the_field(server, body, param, status):
    r = httpx.post(f"{server.url}/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


def test_malformed_json_and_oversize_body(server):
    r = httpx.post(f"{server.url}/v1/images/generations", content=b"{nope",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x" * (ServerConfig().max_body_bytes + 1)})
    assert r.status_code == 413


def test_pipeline_exception_fails_only_its_batch_then_next_request_succeeds(server):
    bad = httpx.post(f"{server.url}/v1/images/generations",
                     json={"model": "instaflow-2rf", "prompt": "boom __rfserve_fault__:error", "size": "16x16"})
    assert bad.status_code == 500
    assert "injected fault" in bad.json()["error"]["message"]
    good = httpx.post(f"{server.url}/v1/images/generations",
                      json={"model": "instaflow-2rf", "prompt": "fine", "size": "16x16", "seed": 1})
    assert good.status_code == 200 and good.json()["seed"] == 1
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_concurrent_requests_are_batched(server):
    before = [server.metric(f"rfserve_batch_size_{part}", model="perflow-sd15") for part in ("count", "sum")]
    results = []

    def call(i):
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                       json={"model": "perflow-sd15", "prompt": f"p{i}", "size": "16x16", "seed": i})
        results.append(r.status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    steps, images = (server.metric(f"rfserve_batch_size_{part}", model="perflow-sd15") - before[i]
                     for i, part in enumerate(("count", "sum")))
    assert images / steps > 1.5                                  # rows per step: the requests shared forwards
