"""Every error the API sends carries one `code` from `server.errors.Code`, the set README's error table lists;
a wrong method on any route is a 405 with that route's `Allow`; a NaN or an infinity is refused saying what is
allowed; a deadline no wait can meet is a 504, not a 429. In-process on the embedded model, behind a key."""
import io
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.errors import Code

README = Path(__file__).parents[2] / "README.md"
MAX_BODY = 64 << 10
GEN, EDITS, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
HI = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.fixture(scope="module")
def served():
    engine = Engine(ServerConfig(models=["rf-shapes"], device="cpu", warmup=False, api_keys=["k1"],
                                 max_body_bytes=MAX_BODY))
    engine.load(progress=False)
    with TestClient(create_app(engine), headers={"Authorization": "Bearer k1"}) as client:
        yield engine, client
    engine.shutdown()


def raw_json(text: str) -> dict:
    """A body as written (Python's json reads NaN and Infinity, which `json=` cannot send)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


BAD = {
    "wrong key": ("GET", "/v1/models", {"headers": {"Authorization": "Bearer k2"}}, Code.INVALID_API_KEY, None),
    "no route": ("GET", "/v1/nothing", {}, Code.NOT_FOUND, None),
    "no static file": ("GET", "/static/nothing.js", {}, Code.NOT_FOUND, "name"),
    "unknown image": ("GET", "/v1/images/abc", {}, Code.IMAGE_NOT_FOUND, "image_id"),
    "wrong method": ("GET", GEN, {}, Code.METHOD_NOT_ALLOWED, None),
    "not JSON": ("POST", GEN, raw_json("{"), Code.INVALID_JSON, None),
    "no body": ("POST", GEN, {}, Code.MISSING_BODY, None),
    "not an object": ("POST", GEN, raw_json("[1]"), Code.INVALID_BODY, None),
    "unknown field": ("POST", GEN, {"json": {"prompt": "x", "colour": "red"}}, Code.UNKNOWN_PARAMETER, "colour"),
    "no prompt": ("POST", GEN, {"json": {}}, Code.MISSING_REQUIRED_PARAMETER, "prompt"),
    "wrong type": ("POST", GEN, {"json": {"prompt": "x", "n": "2"}}, Code.INVALID_VALUE, "n"),
    "blank prompt": ("POST", GEN, {"json": {"prompt": " "}}, Code.INVALID_VALUE, "prompt"),
    "size": ("POST", GEN, {"json": {"prompt": "x", "size": "1x1"}}, Code.INVALID_VALUE, "size"),
    "stream n": ("POST", GEN, {"json": {"prompt": "x", "stream": True, "n": 2}}, Code.INVALID_VALUE, "n"),
    "steps": ("POST", GEN, {"json": {"prompt": "x", "num_inference_steps": 10_000}}, Code.INVALID_VALUE,
              "num_inference_steps"),
    "guidance NaN": ("POST", GEN, raw_json('{"prompt": "x", "guidance_scale": NaN}'), Code.INVALID_VALUE,
                     "guidance_scale"),
    "timeout NaN": ("POST", GEN, raw_json('{"prompt": "x", "timeout": NaN}'), Code.INVALID_VALUE, "timeout"),
    "timeout zero": ("POST", GEN, {"json": {"prompt": "x", "timeout": 0}}, Code.INVALID_VALUE, "timeout"),
    "timeout too long": ("POST", GEN, {"json": {"prompt": "x", "timeout": 1e6}}, Code.INVALID_VALUE, "timeout"),
    "unknown model": ("POST", GEN, {"json": {"prompt": "x", "model": "nope"}}, Code.MODEL_NOT_FOUND, "model"),
    "body over the limit": ("POST", GEN, {"content": b"x" * (MAX_BODY + 1)}, Code.BODY_TOO_LARGE, None),
    "streamed body over the limit": ("POST", GEN, {"content": iter([b"x" * MAX_BODY, b"x"])},
                                     Code.BODY_TOO_LARGE, None),
    "edit without image": ("POST", EDITS, {"data": {"prompt": "x"}}, Code.MISSING_REQUIRED_PARAMETER, "image"),
    "edit of no image": ("POST", EDITS, {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"no", "image/png")}},
                         Code.INVALID_IMAGE, "image"),
    "edit strength NaN": ("POST", EDITS, {"data": {"prompt": "x", "strength": "nan"},
                                          "files": {"image": ("a.png", png(), "image/png")}}, Code.INVALID_VALUE,
                          "strength"),
    "broken form": ("POST", EDITS, {"content": b"--b\r\nnot a part", "headers": {
        "content-type": "multipart/form-data; boundary=b"}}, Code.INVALID_BODY, None),
    "chat, none served": ("POST", CHAT, raw_json("{" + HI + "}"), Code.MODEL_NOT_FOUND, "model"),
    "chat with an image model": ("POST", CHAT, raw_json('{"model": "rf-shapes", ' + HI + "}"),
                                 Code.UNSUPPORTED_MODEL, "model"),
    "chat temperature inf": ("POST", CHAT, raw_json("{" + HI + ', "temperature": Infinity}'), Code.INVALID_VALUE,
                             "temperature"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_kind_of_error_has_its_one_code(served, case):
    _, client = served
    method, path, kwargs, code, param = BAD[case]
    r = client.request(method, path, **kwargs)
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (code.status, code, param), err
    assert err["message"] and err["type"]


def readme_table() -> set[tuple[int, str]]:
    """(status, code) of each row of README's error table: `| 400 | `invalid_json` | when |`."""
    rows = re.findall(r"^ *\| (\d{3}) \| `([a-z_]+)` \| .+ \|$", README.read_text(), re.M)
    return {(int(status), code) for status, code in rows}


def test_readme_and_openapi_list_exactly_the_codes(served):
    _, client = served
    assert readme_table() == {(code.status, code.value) for code in Code}
    doc = client.get("/openapi.json").json()
    assert doc["components"]["schemas"]["Code"]["enum"] == [code.value for code in Code]
    for status, answer in doc["paths"][GEN]["post"]["responses"].items():
        if status != "200":
            assert all(f"`{code}`" in answer["description"] for code in Code if code.status == int(status)), status


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-1", "1e9"])
def test_a_number_out_of_range_is_told_what_is_allowed(served, value):
    engine, client = served
    r = client.post(GEN, **raw_json('{"prompt": "x", "guidance_scale": %s}' % value))
    err = r.json()["error"]
    limit = engine.cards["rf-shapes"].max_guidance
    assert err["message"] == f"guidance_scale: must be a finite number between 0 and {limit:g}"
    assert (r.status_code, err["param"]) == (400, "guidance_scale")


@pytest.mark.parametrize("field,value,allowed", [
    ("strength", "nan", "strength: must be a finite number between 0 and 1"),
    ("strength", "inf", "strength: must be a finite number between 0 and 1"),
])
def test_an_edit_number_out_of_range_is_told_what_is_allowed(served, field, value, allowed):
    _, client = served
    r = client.post(EDITS, data={"prompt": "x", field: value}, files={"image": ("a.png", png(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["message"] == allowed


def routes(router) -> list:
    """Every route with its methods; FastAPI may keep an included router's routes behind one entry."""
    found = []
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        found += routes(inner) if inner is not None else [route] if getattr(route, "methods", None) else []
    return found


def test_every_wrong_method_is_a_405_with_the_routes_allow(served):
    """On every route, the image routes included (`GET /v1/images/generations` once reached the image route)."""
    _, client = served
    every = routes(client.app)
    paths = {re.sub(r"{[^}]+}", "x", route.path) for route in every}
    assert {GEN, EDITS, "/v1/images/x", CHAT, "/static/x"} <= paths
    for path in sorted(paths):
        allowed = set().union(*(r.methods for r in every if r.path_regex.match(path)))
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed:
            r = client.request(method, path)
            assert r.status_code == 405, (method, path, r.text)
            assert set(r.headers["allow"].split(", ")) == allowed, (method, path)
            assert r.json()["error"]["code"] == Code.METHOD_NOT_ALLOWED


def test_a_deadline_no_wait_can_meet_is_504_not_429(served):
    """Retrying cannot help a request whose own image takes longer than its timeout: a 504 naming `timeout`,
    without Retry-After. (The 429 for a queue too long for the deadline is in test_backpressure.py.)"""
    engine, client = served
    assert client.post(GEN, json={"prompt": "a red circle"}).status_code == 200     # the rate is now measured
    timeout = engine.batcher.seconds_for("rf-shapes", 1) / 10
    r = client.post(GEN, json={"prompt": "a red circle", "timeout": timeout})
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (504, Code.DEADLINE_UNMEETABLE, "timeout"), err
    assert "retry-after" not in r.headers
