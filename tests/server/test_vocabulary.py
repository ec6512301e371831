"""The embedded models say what they understand: `/v1/models` lists their vocabulary, and a prompt with other
words still answers, naming them in `warnings` (JSON, edits and the streamed completed event alike)."""
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rfserve.model_zoo.rf_shapes.vocabulary import VOCABULARY
from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine

GEN, EDIT = "/v1/images/generations", "/v1/images/edits"


@pytest.fixture(scope="module")
def client():
    engine = Engine(ServerConfig(models=["rf-shapes", "rf-shapes-2rf", "synthetic"], device="cpu", warmup=False))
    engine.load(progress=False)
    with TestClient(create_app(engine)) as c:
        yield c
    engine.shutdown()


def test_the_model_list_gives_the_embedded_models_vocabulary(client):
    models = {m["id"]: m["vocabulary"] for m in client.get("/v1/models").json()["data"]}
    listed = {"colours": list(VOCABULARY.colours), "shapes": list(VOCABULARY.shapes),
              "counts": list(VOCABULARY.counts), "backgrounds": list(VOCABULARY.backgrounds),
              "examples": list(VOCABULARY.examples)}
    assert models == {"rf-shapes": listed, "rf-shapes-2rf": listed, "synthetic": None}


def test_unknown_words_are_named_and_the_image_still_comes(client):
    r = client.post(GEN, json={"prompt": "a cat on the red background", "seed": 1})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    (warning,) = r.json()["warnings"]
    assert warning.startswith("rf-shapes does not know 'cat': ")
    assert "colours red, orange" in warning and "shapes circle, square, triangle" in warning


def test_a_prompt_in_the_vocabulary_has_no_warnings(client):
    r = client.post(GEN, json={"prompt": "Two red circles, on the blue background", "seed": 1})
    assert r.status_code == 200 and "warnings" not in r.json()


def test_a_free_text_model_never_warns(client):
    r = client.post(GEN, json={"model": "synthetic", "prompt": "a cat", "seed": 1})
    assert r.status_code == 200 and "warnings" not in r.json()


def test_an_edit_names_unknown_words(client):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, "PNG")
    r = client.post(EDIT, files={"image": ("in.png", buf.getvalue(), "image/png")},
                    data={"model": "rf-shapes", "prompt": "a yellow star instead", "seed": "1"})
    assert r.status_code == 200
    (warning,) = r.json()["warnings"]
    assert warning.startswith("rf-shapes does not know 'star', 'instead': the picture does not follow them.")


def test_the_streamed_completed_event_carries_the_warnings(client):
    r = client.post(GEN, json={"model": "rf-shapes-2rf", "prompt": "a cat", "seed": 1, "stream": True,
                               "num_inference_steps": 2})
    events = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "image_generation.completed"
    assert all("warnings" not in e for e in events[:-1])
    assert events[-1]["warnings"][0].startswith("rf-shapes-2rf does not know 'cat'")


def test_the_openapi_document_describes_both(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "warnings" in schemas["ImagesResponse"]["properties"]
    assert "vocabulary" in schemas["ModelObject"]["required"]
    assert set(schemas["VocabularyObject"]["required"]) == {"colours", "shapes", "counts", "backgrounds", "examples"}
