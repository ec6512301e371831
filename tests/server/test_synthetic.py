"""The benchmark-only `synthetic` model: real photographs at the requested sizes, varied by seed, at its pace,
through the same batcher, worker, encoding and HTTP code as any model."""
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.registry import load_model, parse_spec
from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine

SPEC = "synthetic?ms_per_image=20&ms_per_batch=10&sizes=96x64,64x64"


def test_photographs_at_each_size_varied_by_seed_and_paced():
    model = load_model(parse_spec(SPEC), "cpu", None)
    assert model.card.sizes == ("96x64", "64x64") and model.card.defaults.size == "96x64"
    specs = [ImageSpec("", "", seed, 96, 64, 1, 0.0) for seed in (0, 1, 16)]
    model.pipeline.run(specs[:1])                                    # variants are prepared on first use
    start = time.perf_counter()
    images = model.pipeline.run(specs).images
    assert time.perf_counter() - start >= 0.010 + 3 * 0.020          # the pace: 10 ms + 20 ms an image
    assert images.shape == (3, 64, 96, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])                  # another seed, another crop
    assert np.array_equal(images[0], images[2])                      # 16 variants a size
    assert images[0].std() > 20                                      # a photograph, not a flat fill


def test_each_step_takes_the_pace_and_rows_finish_at_their_own_step():
    """A request takes the steps it asks for; a 1-step row leaves after the first step of a 3-step batch."""
    pipe = load_model(parse_spec("synthetic?ms_per_image=20&ms_per_batch=0&sizes=64x64"), "cpu", None).pipeline
    short, long = ImageSpec("", "", 1, 64, 64, 1, 0.0), ImageSpec("", "", 2, 64, 64, 3, 0.0)
    pipe.run([short])
    running = pipe.begin([short, long])
    start = time.perf_counter()
    pipe.step(running)
    assert time.perf_counter() - start >= 2 * 0.020 and running.finished() == [0]
    assert pipe.finish(running, [0]).images.shape == (1, 64, 64, 3) and running.specs == [long]
    start = time.perf_counter()
    pipe.step(running)
    assert 0.020 <= time.perf_counter() - start < 0.040 and running.stepping() == [0]


def test_a_folder_of_photographs_and_bad_options(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    model = load_model(parse_spec(f"synthetic={tmp_path}?ms_per_image=0&sizes=32x32"), "cpu", None)
    assert model.pipeline.run([ImageSpec("", "", 3, 32, 32, 1, 0.0)]).images.shape == (1, 32, 32, 3)
    for bad, words in [("synthetic?ms_per_image=fast", "ms_per_image must be a number"),
                       ("synthetic?sizes=big", "?sizes takes WxH"), ("synthetic?sizes=2x2", "8 to 4096")]:
        with pytest.raises(CheckpointError, match=words.replace("?", r"\?")):
            load_model(parse_spec(bad), "cpu", None)
    (tmp_path / "a.png").unlink()
    with pytest.raises(CheckpointError, match="no .jpg"):
        load_model(parse_spec(f"synthetic={tmp_path}"), "cpu", None)


def test_it_serves_through_the_ordinary_http_path():
    engine = Engine(ServerConfig(models=[SPEC], device="cpu", warmup=False))
    engine.load(progress=False)
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/images/generations", json={"prompt": "anything", "n": 2, "size": "64x64",
                                                             "output_format": "jpeg"})
            assert r.status_code == 200 and r.json()["size"] == "64x64" and len(r.json()["data"]) == 2
            refused = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 101})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "num_inference_steps"
    finally:
        engine.shutdown()
