"""The step loop, for every multi-step family: a request that leaves mid-batch goes within one step and is
answered at once, while the rows that stay make the same images as a batch it never joined (the seed
contract); a streaming row gets its previews there and changes no image."""
import time
from dataclasses import replace

import numpy as np
import pytest

from rfserve import kernels
import rfserve.model_zoo.hunyuan_dit.pipeline as hunyuan
import rfserve.model_zoo.instaflow.pipeline as instaflow
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.scheduler import DeadlineExceeded

STEPS = 8


def tiny_janus(folder):
    from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(folder, "tiny", seed=0)


def tiny_hunyuan(folder):
    from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan

    return save_random_hunyuan(folder, "tiny", seed=0)


# (preset, checkpoint maker or the tiny_sd fixture, the per-step function to watch: module and name; rows per image)
FAMILIES = {
    "instaflow": ("instaflow-2rf", None, instaflow, "euler_update", 1),
    "janusflow": ("janusflow-1.3b", tiny_janus, kernels, "janus_cfg_euler_step", 1),
    "hunyuan-dit": ("hunyuan-dit-v1.2", tiny_hunyuan, hunyuan, "guided_prediction", 2),   # sees CFG's 2B rows
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path_factory, tiny_sd):
    preset, make, module, name, rows = FAMILIES[request.param]
    folder = tiny_sd if make is None else make(tmp_path_factory.mktemp(request.param))
    engine = Engine(ServerConfig(models=[f"{preset}={folder}"], device="cpu", warmup=False, max_batch=4,
                                 max_wait_ms=200))
    engine.load(progress=False)
    yield engine, preset, module, name, rows
    engine.shutdown()


class StepSpy:
    """Wraps a sampling loop's per-step function: the batch size at every step, and an action at one step."""

    def __init__(self, inner, at_step: int, action):
        self.inner, self.at_step, self.action = inner, at_step, action
        self.sizes: list[int] = []

    def __call__(self, x, *args, **kwargs):
        self.sizes.append(x.shape[0])
        if len(self.sizes) == self.at_step:
            self.action()
        return self.inner(x, *args, **kwargs)


def submit_together(engine, preset, groups):
    """Jobs queued at once, so the batcher puts them in one batch; guidance on, so CFG rows pair up."""
    base = replace(engine.default_spec(engine.cards[preset], "a red circle", 0), steps=STEPS, guidance=2.0)
    return [engine.submit(preset, [replace(base, prompt=f"a red circle {s}", seed=s) for s in seeds])
            for seeds in groups]


def test_a_cancelled_request_leaves_within_one_step_and_the_rest_are_unchanged(family, monkeypatch):
    engine, preset, module, name, rows = family
    jobs = []
    spy = StepSpy(getattr(module, name), at_step=3, action=lambda: jobs[1].cancel())
    monkeypatch.setattr(module, name, spy)
    jobs.extend(submit_together(engine, preset, [[1], [2, 3], [4]]))
    kept = [jobs[0].future.result(120).images[0], jobs[2].future.result(120).images[0]]
    assert jobs[1].future.cancelled()
    assert spy.sizes == [4 * rows] * 3 + [2 * rows] * (STEPS - 3), spy.sizes     # its two rows gone after step 3
    assert engine.metrics.dropped.labels(preset, "client_gone")._value.get() == 1

    monkeypatch.setattr(module, name, spy.inner)
    alone = submit_together(engine, preset, [[1], [4]])
    for got, want in zip(kept, [j.future.result(120).images[0] for j in alone]):
        assert np.array_equal(got, want)


def test_a_request_past_its_deadline_leaves_and_a_batch_of_none_stops(family, monkeypatch):
    engine, preset, module, name, _ = family
    jobs = []
    spy = StepSpy(getattr(module, name), at_step=2, action=lambda: setattr(jobs[0], "deadline", time.monotonic()))
    monkeypatch.setattr(module, name, spy)
    jobs.extend(submit_together(engine, preset, [[5, 6]]))
    with pytest.raises(DeadlineExceeded):
        jobs[0].future.result(120)
    assert len(spy.sizes) == 2                     # the batch stopped once nobody was left in it
    assert engine.metrics.dropped.labels(preset, "deadline")._value.get() == 1
    again = submit_together(engine, preset, [[7]])[0]     # the worker goes on serving
    assert len(again.future.result(120).images) == 1


def test_a_streaming_row_gets_its_previews_and_changes_no_image(family):
    """Previews are taken between steps for the streaming row only: they arrive evenly spaced, and neither its
    image nor its batch-mate's differs from the same requests unstreamed."""
    engine, preset, *_ = family
    base = replace(engine.default_spec(engine.cards[preset], "a red circle", 0), steps=STEPS, guidance=2.0)
    specs = {s: [replace(base, prompt=f"a red circle {s}", seed=s)] for s in (1, 2)}
    previews: list[tuple[int, np.ndarray]] = []
    streamed = [engine.submit(preset, specs[1], partial_images=3, on_partial=lambda i, img: previews.append((i, img))),
                engine.submit(preset, specs[2])]
    images = [j.future.result(120).images[0] for j in streamed]
    steps = engine.metrics.batch_size.labels(preset)
    assert (steps._sum.get(), sum(b.get() for b in steps._buckets)) == (2 * STEPS, STEPS)   # both, every step
    assert [i for i, _ in previews] == [0, 1, 2]
    assert all(img.shape == images[0].shape and img.dtype == np.uint8 for _, img in previews)
    plain = [engine.submit(preset, specs[s]) for s in (1, 2)]
    for got, want in zip(images, [j.future.result(120).images[0] for j in plain]):
        assert np.array_equal(got, want)
