"""The OpenAPI document against what the server does, in-process on the embedded models."""
import pytest
from fastapi.testclient import TestClient

from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.schemas import NON_BLANK

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def served():
    """rf-shapes (1 step by default) and rf-shapes-2rf (16 by default) under a 4-step cap, behind a key."""
    engine = Engine(ServerConfig(models=["rf-shapes", "rf-shapes-2rf"], device="cpu", max_steps=4, warmup=False,
                                 api_keys=["k1"], max_images_per_request=3))
    engine.load(progress=False)
    with TestClient(create_app(engine), headers={"Authorization": "Bearer k1"}) as client:
        yield client, client.get("/openapi.json").json()
    engine.shutdown()


def test_every_error_status_has_the_openai_body_and_no_422_is_promised(served):
    _, doc = served
    images = doc["paths"]["/v1/images/generations"]["post"]["responses"]
    assert sorted(images) == ["200", "400", "401", "404", "413", "429", "499", "500", "503", "504", "507"]
    for path, operations in doc["paths"].items():
        for op in operations.values():
            assert "422" not in op["responses"], path
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and path not in ("/health", "/ready"):
                    assert answer["content"]["application/json"]["schema"] == ERROR_REF, (path, status)
    for status in ("429", "503"):
        assert images[status]["headers"]["Retry-After"]["required"] is True
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(doc["paths"]["/v1/images/{image_id}"]["get"]["responses"]["200"]["content"]) == [
        "image/png", "image/jpeg", "image/webp"]


def test_the_image_request_is_one_schema_per_model_with_its_limits(served):
    _, doc = served
    body = doc["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    names = [ref["$ref"].rsplit("/", 1)[1] for ref in body["oneOf"]]
    assert names == ["ImageGenerationRequest.rf-shapes", "ImageGenerationRequest.rf-shapes-2rf"]
    first, second = (doc["components"]["schemas"][n] for n in names)
    assert "model" not in first["required"] and "model" in second["required"]
    assert second["properties"]["model"] == {"type": "string", "const": "rf-shapes-2rf"}
    for schema in (first, second):
        props = schema["properties"]
        assert props["size"]["anyOf"][0]["enum"] == ["64x64"]
        assert props["num_inference_steps"]["anyOf"][0]["maximum"] == 4
        assert props["n"]["maximum"] == 3
        assert props["prompt"]["pattern"] == NON_BLANK
    assert second["properties"]["num_inference_steps"]["default"] == 4     # 8, capped by --max-steps


def test_the_capped_default_is_served(served):
    client, _ = served
    r = client.post("/v1/images/generations", json={"model": "rf-shapes-2rf", "prompt": "a red circle"})
    assert r.status_code == 200, r.text


def test_chat_is_not_documented_where_no_model_chats(served):
    client, doc = served
    assert "/v1/chat/completions" not in doc["paths"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no served model supports chat"


def test_keys_are_documented_on_the_routes_that_need_them(served):
    _, doc = served
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert "401" not in doc["paths"]["/metrics"]["get"]["responses"]   # open unless --protect-metrics


def test_a_request_without_a_body_is_told_so(served):
    client, _ = served
    for kwargs in ({}, {"content": b"[1]", "headers": {"content-type": "application/json"}},
                   {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}):
        r = client.post("/v1/images/generations", **kwargs)
        assert r.status_code == 400, kwargs
        assert r.json()["error"]["message"].startswith("request body "), r.text
    assert "missing" in client.post("/v1/images/generations").json()["error"]["message"]


def test_a_405_lists_the_allowed_methods(served):
    client, _ = served
    r = client.delete("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["type"] == "invalid_request_error"
