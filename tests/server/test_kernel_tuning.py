"""Kernel timing belongs to warm-up: where the dispatcher can time (CUDA; faked here), warm-up runs every size the
model accepts at every batch bucket, and once ready a request of any size, batch or guidance times nothing."""
import pytest
import torch
from fastapi.testclient import TestClient

from rfserve import kernels
from rfserve.kernels import dispatch, tuning
from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine


@pytest.fixture
def timed(monkeypatch):
    """A device the dispatcher times: every timing is recorded, and the twin always wins (no kernel runs)."""
    calls = []
    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_ms", lambda fn: calls.append(fn) or 1.0)
    kernels.clear_decisions()
    yield calls
    kernels.clear_decisions()
    tuning.thaw()


def test_warm_up_times_every_size_and_nothing_after_ready(tiny_sd, timed):
    engine = Engine(ServerConfig(models=[f"perflow-sd15={tiny_sd}"], device="cpu", max_batch=2,
                                 batch_buckets=(1, 2), cpu_threads=1, compile="off"))   # no background compile
    engine.load(progress=False)
    try:
        card = engine.models["perflow-sd15"].card
        assert len(card.sizes) > 1 and tuning.frozen()
        parts = engine.models["perflow-sd15"].pipeline.parts
        scale, channels = parts.vae_scale_factor, parts.unet.config.in_channels
        measured = {k[2] for k, d in kernels.decisions().items() if k[0] == "perflow" and d.reason == "measured"}
        for size in card.sizes:                                      # PeRFlow's update: one per latent batch
            w, h = (int(x) for x in size.split("x"))
            assert {tuning.buckets([b * channels * (w // scale) * (h // scale)]) for b in (1, 2)} <= measured, size
        before = len(timed)
        with TestClient(create_app(engine)) as client:
            for size, body in zip(card.sizes, ({"n": 1}, {"n": 2, "guidance_scale": 1.0}, {"n": 2}) * 3):
                r = client.post("/v1/images/generations", json={
                    "model": "perflow-sd15", "prompt": "a red circle", "size": size, "num_inference_steps": 1, **body})
                assert r.status_code == 200, r.text
        assert len(timed) == before
    finally:
        engine.shutdown()
