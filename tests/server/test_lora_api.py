"""LoRA adapters through the API (issue #34): `--lora` at start and `POST /v1/loras` at run time, chosen per
request in `lora`, listed in /v1/models and /v1/loras, unloaded by DELETE once no request uses them. An image
made through the server with an adapter is the one our pipeline makes with it alone; rows with different
adapters share a batch; every misuse is a 4xx naming its field."""
import base64
import io
import json
import re
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import PoolConfig
from rfserve.model_zoo.running import Stepped
from rfserve.server.app import create_app
from rfserve.server.config import LoraConfig, ServerConfig
from rfserve.server.engine import Engine
from tests.lora.adapters import SPECS, make

ONE = "instaflow-2rf"
OTHER = "perflow-sd15"


@pytest.fixture(scope="module")
def made(tiny_sd, tmp_path_factory):
    base = InstaFlowPipeline.from_pretrained(tiny_sd)
    folder = tmp_path_factory.mktemp("api-loras")
    return {name: make(spec, base.parts.unet, base.parts.text_encoder, folder, seed=i + 21)
            for i, (name, spec) in enumerate(SPECS.items())}


def start(tiny_sd, made, **config):
    lora = config.pop("lora", LoraConfig(adapters=[f"a={made['a'].kohya_file}?model={ONE}"], slots=3, max_rank=4))
    config = {"max_wait_ms": 50, **config}
    engine = Engine(ServerConfig(models=[f"{ONE}={tiny_sd}", f"{OTHER}={tiny_sd}"], device="cpu", warmup=False,
                                 lora=lora, **config))
    engine.load(progress=False)
    return engine


@pytest.fixture(scope="module")
def served(tiny_sd, made):
    engine = start(tiny_sd, made)
    with TestClient(create_app(engine)) as client:
        yield engine, client
    engine.shutdown()


def image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))


def body(lora=None, **extra):
    out = {"model": ONE, "prompt": "a red square on blue", "seed": 3, "num_inference_steps": 2, **extra}
    return out if lora is None else {**out, "lora": lora}


def alone(tiny_sd, made, engine, choice) -> np.ndarray:
    """What our pipeline makes for the request's spec with `choice`'s adapters registered and nothing else."""
    pipe = InstaFlowPipeline.from_pretrained(tiny_sd)
    pipe.enable_lora(PoolConfig(slots=3, max_rank=4, max_rows=4))
    for name, _ in choice:
        pipe.register_lora(name, load_lora(made[name].diffusers_dir))
    spec = replace(engine.default_spec(engine.cards[ONE], "a red square on blue", 3), steps=2, lora=choice)
    return Stepped.run(pipe, [spec]).images[0]


def test_an_adapter_named_at_start_is_listed_and_makes_its_image(served, tiny_sd, made):
    engine, client = served
    models = {m["id"]: m["loras"] for m in client.get("/v1/models").json()["data"]}
    assert models == {ONE: ["a"], OTHER: []}
    listed = client.get("/v1/loras").json()["data"]
    assert [(x["id"], x["model"], x["rank"], x["components"]) for x in listed] == [
        ("a", ONE, 4, ["text_encoder", "unet"])]
    plain, with_a = image(client.post("/v1/images/generations", json=body())), \
        image(client.post("/v1/images/generations", json=body("a")))
    assert np.abs(plain.astype(int) - with_a.astype(int)).max() > 8
    assert np.abs(with_a.astype(int) - alone(tiny_sd, made, engine, (("a", 1.0),)).astype(int)).max() <= 1


def test_an_adapter_loaded_at_run_time_serves_mixed_with_others_then_unloads(served, tiny_sd, made):
    engine, client = served
    loaded = client.post("/v1/loras", json={"name": "b", "path": str(made["b"].kohya_file)})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model"] == ONE                         # the first model that takes LoRA
    choices = [None, "a", [{"name": "b", "scale": 0.5}], [{"name": "a", "scale": -1.0}, {"name": "b"}]]
    results, pipe, mixes = [None] * len(choices), engine.models[ONE].pipeline, []
    step = pipe.step
    pipe.step = lambda running: (mixes.append({s.lora for s in running.specs}), step(running))[1]

    def send(i):
        results[i] = client.post("/v1/images/generations", json=body(choices[i]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(choices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = [(), (("a", 1.0),), (("b", 0.5),), (("a", -1.0), ("b", 1.0))]
    for got, choice in zip(results, expected):
        assert np.abs(image(got).astype(int) - alone(tiny_sd, made, engine, choice).astype(int)).max() <= 1
    del pipe.step
    assert max(map(len, mixes)) >= 3                  # a step ran rows of three adapter choices together
    gone = client.delete("/v1/loras/b")
    assert gone.status_code == 200 and gone.json() == {"id": "b", "object": "lora", "deleted": True}
    refused = client.post("/v1/images/generations", json=body("b"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora"
    assert "b" not in engine.models[ONE].pipeline.lora_names()
    assert client.delete("/v1/loras/b").status_code == 404


@pytest.mark.parametrize("lora, param, words", [
    ("nope", "lora", "no adapter 'nope'"),
    ([{"name": "a", "scale": 4.5}], "lora.0.scale", "between -4 and 4"),
    ([{"name": "a", "scale": float("nan")}], "lora.0.scale", "finite"),
    ([{"name": "a"}, {"name": "a"}], "lora", "named twice"),
    ([{"name": "a"}, {"name": "c"}, {"name": "d"}], "lora", "at most 2"),
    ([], "lora", None),
    ([{"name": "a", "weight": 1}], "lora.0.weight", None),
    ("[not json", "lora", "not a name"),
])
def test_a_bad_lora_field_is_a_400_naming_it(served, lora, param, words):
    _, client = served
    r = client.post("/v1/images/generations", content=json.dumps(body(lora)),     # NaN as Python writes it
                    headers={"content-type": "application/json"})
    if lora == []:                                   # an empty list means no adapter, as leaving it out
        assert r.status_code == 200
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert words is None or words in r.json()["error"]["message"]


def test_an_adapter_for_another_model_or_a_model_without_lora_is_refused(served, made):
    _, client = served
    r = client.post("/v1/loras", json={"name": "p", "path": str(made["c"].kohya_file), "model": OTHER})
    assert r.status_code == 200, r.text
    r = client.post("/v1/images/generations", json=body("p"))
    assert r.status_code == 400 and "is for perflow-sd15, not instaflow-2rf" in r.json()["error"]["message"]
    assert client.delete("/v1/loras/p").status_code == 200


@pytest.mark.parametrize("request_body, status, param", [
    ({"name": "a", "path": "x"}, 409, "name"),
    ({"name": "bad name", "path": "x"}, 400, "name"),
    ({"name": "z", "path": "/no/such/file.safetensors"}, 400, "path"),
    ({"name": "z", "path": "x", "model": "nope"}, 404, "model"),
    ({"name": "z"}, 400, "path"),
])
def test_loading_refusals_name_the_field(served, request_body, status, param):
    _, client = served
    r = client.post("/v1/loras", json=request_body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert [x["id"] for x in client.get("/v1/loras").json()["data"]] == ["a"]


def test_pickled_files_load_at_start_but_never_through_the_api(served, made, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "a.bin"
    torch.save(load_file(str(made["a"].kohya_file)), pickled)
    assert load_lora(pickled).rank == 4
    r = served[1].post("/v1/loras", json={"name": "z", "path": str(pickled)})
    assert r.status_code == 400 and "only .safetensors" in r.json()["error"]["message"]


def test_delete_waits_for_the_requests_that_use_the_adapter(served, made):
    engine, client = served
    assert client.post("/v1/loras", json={"name": "c", "path": str(made["c"].kohya_file)}).status_code == 200
    spec = replace(engine.default_spec(engine.cards[ONE], "x", 0), lora=(("c", 1.0),))
    held = engine.adapters.hold([spec])                  # an accepted request, not yet answered
    assert client.delete("/v1/loras/c").status_code == 200
    assert "c" not in [x["id"] for x in client.get("/v1/loras").json()["data"]]
    assert "c" in engine.models[ONE].pipeline.lora_names()          # still on the model for its request
    engine.adapters.release(held)
    deadline = time.monotonic() + 5
    while "c" in engine.models[ONE].pipeline.lora_names() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "c" not in engine.models[ONE].pipeline.lora_names()
    assert client.post("/v1/loras", json={"name": "c", "path": str(made["c"].kohya_file)}).status_code == 200
    assert client.delete("/v1/loras/c").status_code == 200


def test_more_adapters_than_slots_in_one_batch_split_and_all_answer(tiny_sd, made):
    """Two slots, three adapters queued together with joining off: the batch splits until its halves fit."""
    lora = LoraConfig(adapters=[f"{n}={made[n].kohya_file}?model={ONE}" for n in "abc"], slots=2, max_rank=4)
    engine = start(tiny_sd, made, lora=lora, continuous=False, max_wait_ms=300)
    try:
        spec = replace(engine.default_spec(engine.cards[ONE], "a red square on blue", 3), steps=2)
        jobs = [engine.submit(ONE, [replace(spec, lora=((n, 1.0),))]) for n in "abc"]
        got = [job.future.result(60).images[0] for job in jobs]
        for n, im in zip("abc", got):
            assert np.abs(im.astype(int) - alone(tiny_sd, made, engine, ((n, 1.0),)).astype(int)).max() <= 1
    finally:
        engine.shutdown()


def test_a_model_started_without_lora_refuses_the_field_and_the_route(tiny_sd, made):
    engine = start(tiny_sd, made, lora=LoraConfig())
    try:
        with TestClient(create_app(engine)) as client:
            assert {m["loras"] for m in client.get("/v1/models").json()["data"]} == {None}
            r = client.post("/v1/images/generations", json=body("a"))
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
            r = client.post("/v1/loras", json={"name": "a", "path": str(made["a"].kohya_file)})
            assert r.status_code == 405 and r.headers["allow"] == "GET"
            assert client.delete("/v1/loras/a").status_code == 404
    finally:
        engine.shutdown()


def test_keys_protect_the_adapter_routes(tiny_sd, made):
    engine = start(tiny_sd, made, api_keys=["k"])
    try:
        with TestClient(create_app(engine)) as client:
            assert client.post("/v1/loras", json={"name": "b", "path": str(made["b"].kohya_file)}).status_code == 401
            assert client.delete("/v1/loras/a").status_code == 401
            ok = client.delete("/v1/loras/a", headers={"Authorization": "Bearer k"})
            assert ok.status_code == 200
    finally:
        engine.shutdown()


def test_hunyuan_dit_serves_its_transformer_adapters(tmp_path):
    """The engine enables Hunyuan-DiT's pool at its transformer's own targets and `--lora` loads a diffusers/peft
    transformer file: the served image is what our pipeline makes with that adapter alone."""
    from diffusers import HunyuanDiT2DModel

    from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
    from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan
    from tests.lora.adapters import TRANSFORMER_SPECS, make_transformer

    root = save_random_hunyuan(tmp_path / "hunyuan", "tiny", seed=0)
    adapter = make_transformer("x", TRANSFORMER_SPECS["x"], HunyuanDiT2DModel.from_pretrained(root / "transformer"),
                               tmp_path, seed=5).folder
    name = "hunyuan-dit-v1.2"
    engine = Engine(ServerConfig(models=[f"{name}={root}"], device="cpu", warmup=False, max_wait_ms=0,
                                 lora=LoraConfig(adapters=[f"x={adapter}"], slots=2, max_rank=4)))
    engine.load(progress=False)
    try:
        spec = replace(engine.default_spec(engine.cards[name], "a cat", 1), steps=2)
        plain, with_x = (engine.submit(name, [replace(spec, lora=lora)]).future.result(60).images[0]
                         for lora in ((), (("x", 0.8),)))
        pipe = HunyuanPipeline.from_pretrained(root)
        pipe.enable_lora(PoolConfig(slots=1, max_rank=4, max_rows=2))
        pipe.register_lora("x", load_lora(adapter))
        alone_x = Stepped.run(pipe, [replace(spec, lora=(("x", 0.8),))]).images[0]
        assert np.abs(plain.astype(int) - with_x.astype(int)).max() > 8
        assert np.abs(with_x.astype(int) - alone_x.astype(int)).max() <= 1
        assert all(n.startswith("blocks.") for n in engine.models[name].pipeline.adapters.denoiser.layers)
    finally:
        engine.shutdown()


def _lora_docs(client) -> dict:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    return {name.split(".", 1)[1]: s["properties"]["lora"] for name, s in schemas.items()
            if name.startswith("ImageGenerationRequest.")}


def test_the_document_names_each_models_adapters_as_they_change(served, made):
    _, client = served
    docs = _lora_docs(client)
    assert docs[ONE]["anyOf"][0] == {"type": "string", "enum": ["a"]} and docs[ONE]["anyOf"][1]["maxItems"] == 2
    assert docs[OTHER]["type"] == "null" and "no LoRA adapter loaded" in docs[OTHER]["description"]
    assert {"get", "post"} <= set(client.get("/openapi.json").json()["paths"]["/v1/loras"])
    loaded = client.post("/v1/loras", json={"name": "q", "path": str(made["c"].kohya_file), "model": OTHER})
    assert loaded.status_code == 200
    assert _lora_docs(client)[OTHER]["anyOf"][0]["enum"] == ["q"]
    assert client.delete("/v1/loras/q").status_code == 200
    assert _lora_docs(client)[OTHER]["type"] == "null"


def test_a_server_without_lora_documents_no_adapter_routes_and_no_lora_field(tiny_sd, made):
    engine = start(tiny_sd, made, lora=LoraConfig())
    try:
        with TestClient(create_app(engine)) as client:
            paths = client.get("/openapi.json").json()["paths"]
            assert set(paths["/v1/loras"]) == {"get"} and "/v1/loras/{name}" not in paths
            assert {d["type"] for d in _lora_docs(client).values()} == {"null"}
    finally:
        engine.shutdown()


@pytest.mark.parametrize("settings, flag", [({"slots": 1}, "--max-loras-per-request (2) cannot exceed --max-loras (1)"),
                                            ({"slots": 0, "per_request": 0}, "--max-loras: must be at least 1"),
                                            ({"max_rank": 0}, "--max-lora-rank: must be at least 1")])
def test_a_pool_whose_requests_could_not_fit_is_refused_wherever_it_is_configured(settings, flag):
    """The CLI, Ray Serve and an embedding all build a LoraConfig: a request's adapters must fit the slots
    together, or the worker would split its row to no end."""
    with pytest.raises(ValueError, match=re.escape(flag)):
        LoraConfig(**settings)
