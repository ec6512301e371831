"""Bucket plans, padding that never leaks into responses, and /ready after warm-up."""
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rfserve.model_zoo.base import BatchOutput, ImageSpec
from rfserve.model_zoo.running import Running, Stepped
from rfserve.server.app import create_app
from rfserve.server.buckets import BucketPlan
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.metrics import Metrics
from rfserve.server.scheduler import Batcher, Job
from rfserve.server.worker import Worker


def test_bucket_for_and_measured_padding():
    costs = {1: 1.0, 2: 1.1, 3: 5.0, 4: 1.2, 5: 9.0, 6: 1.0, 7: 1.4, 8: 1.3}
    plan = BucketPlan.measure((1, 2, 4, 8), lambda n: costs[n])
    assert plan.bucket_for(3) == 4 and plan.bucket_for(8) == 8 and plan.bucket_for(9) is None
    assert plan.run_size(3) == 4                      # bucket 4 measured faster than eager 3
    assert plan.run_size(6) == 6 and plan.run_size(7) == 8
    assert plan.run_size(9) == 9 and BucketPlan().run_size(5) == 5


class RecordingPipeline(Stepped):
    """Each image's pixels carry its seed, so misrouted or padded rows are visible."""

    def __init__(self):
        self.sizes = []

    def begin(self, specs):
        self.sizes.append(len(specs))
        return Running(specs, [False] * len(specs), [s.steps for s in specs], {})

    def step(self, running):
        running.advance()

    def finish(self, running, rows):
        images = np.stack([np.full((2, 2, 3), running.specs[i].seed, dtype=np.uint8) for i in rows])
        running.leave(rows)
        return BatchOutput(images, [False] * len(rows), {"sample": 0.0})


def test_padding_rows_are_never_returned():
    pipe = RecordingPipeline()
    batcher = Batcher(["m"], max_batch=8, max_wait_ms=0, max_queue=10)
    plan = BucketPlan((4, 8), pad={1: True, 2: True, 3: True, 5: True, 6: True, 7: True})
    worker = Worker(batcher, {"m": pipe}, Metrics(), plans={"m": plan})
    jobs = [Job("m", [ImageSpec("p", "", seed, 8, 8, 1, 0.0) for seed in seeds], time.monotonic() + 60)
            for seeds in ([10, 11], [20])]
    for j in jobs:
        batcher.submit(j)
    worker.run_batch(batcher.next_batch(timeout=0))
    assert pipe.sizes == [4]                          # 3 images padded to the bucket of 4
    first, second = (j.future.result(timeout=0) for j in jobs)
    assert [int(img[0, 0, 0]) for img in first.images] == [10, 11]
    assert [int(img[0, 0, 0]) for img in second.images] == [20]


def test_ready_flips_only_after_warm_up(tiny_sd, monkeypatch):
    gate = threading.Event()
    original = Engine._warm

    def slow_warm(self, *args, **kwargs):
        gate.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_warm", slow_warm)
    engine = Engine(ServerConfig(models=[f"instaflow-0.9b={tiny_sd}"], device="cpu", compile="off"))
    client = TestClient(create_app(engine))
    loader = threading.Thread(target=engine.load, kwargs={"progress": False})
    loader.start()
    try:
        assert client.get("/ready").status_code == 503
        r = client.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        loader.join(60)
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 200
    finally:
        gate.set()
        engine.shutdown()


@pytest.mark.gpu
def test_compiled_path_matches_eager_in_bf16(tiny_sd):
    import torch

    from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline

    pipe = InstaFlowPipeline.from_pretrained(tiny_sd, device="cuda", dtype=torch.bfloat16)
    w, h = pipe.default_size
    specs = [ImageSpec("a cat", "", s, w, h, 2, 1.5) for s in range(4)]
    eager, _ = pipe.images(specs)
    fast_path = pipe.fast_path()
    fast_path.prepare("reduce-overhead")
    for _ in range(2):
        pipe.images(specs)
    fast_path.finish_capture()
    fast, _ = pipe.images(specs)
    assert pipe.parts.denoiser.shapes and pipe.parts.vae_decode.shapes
    assert torch.allclose(eager.float(), fast.float(), atol=3e-2)
