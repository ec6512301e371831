"""One engine, one device: chat streams and a multi-step text-to-image batch on one tiny JanusFlow.

Every LLM forward (image steps and chat prefills and decode steps alike) goes through `run_layers`;
instrumented, no two may overlap. Chat tokens keep coming while the image batch runs, and the greedy
text is the same as when chat runs alone."""
import threading
import time

import pytest

import rfserve.model_zoo.janusflow.decoder as decoder_module
import rfserve.model_zoo.janusflow.pipeline as pipeline_module
from rfserve.server.chat.batcher import ChatSequence
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from tests.janusflow.test_chat_batcher import Collector, prompt_inputs

MODEL = "janusflow-1.3b"
QUESTIONS = ("hi", "what color is the sky", "a longer question about numbers 0 1 2 3 4")


class Overlap:
    """Wraps run_layers: counts forwards in flight and records when each ran, by thread."""

    def __init__(self, inner):
        self.inner, self.lock = inner, threading.Lock()
        self.in_flight = self.most = 0
        self.calls: list[tuple[str, float]] = []

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.calls.append((threading.current_thread().name, time.monotonic()))
        try:
            time.sleep(0.002)        # widen each forward, so an overlap cannot slip between two checks
            return self.inner(*args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def engine(tiny_janus):
    engine = Engine(ServerConfig(models=[f"{MODEL}={tiny_janus}"], device="cpu", warmup=False, max_batch=2))
    engine.load(progress=False)
    yield engine
    engine.shutdown()


def chat_all(engine, max_tokens=24):
    parts, sinks = engine.chat_parts(MODEL), []
    for question in QUESTIONS:
        ids, pixels, positions = prompt_inputs(parts, question, [])
        sink = Collector()
        engine.chat_batcher(MODEL).submit(ChatSequence(ids, pixels, positions, max_tokens, 0.0, 1.0, [], None, sink))
        sinks.append(sink)
    return sinks


def texts(sinks):
    for sink in sinks:
        assert sink.done.wait(120)
    return ["".join(e.delta for e in s.events) for s in sinks]


def test_image_steps_and_chat_steps_never_overlap_and_chat_keeps_flowing(engine, monkeypatch):
    alone = texts(chat_all(engine))
    spy = Overlap(pipeline_module.run_layers)
    monkeypatch.setattr(pipeline_module, "run_layers", spy)
    monkeypatch.setattr(decoder_module, "run_layers", spy)
    specs = [engine.default_spec(engine.cards[MODEL], "a red fox", i) for i in range(2)]
    specs = [type(s)(s.prompt, s.negative_prompt, s.seed, s.width, s.height, 30, s.guidance) for s in specs]
    job = engine.submit(MODEL, specs)
    while not any(name == "rfserve-worker" for name, _ in spy.calls):       # the image batch has started
        time.sleep(0.001)
    together = texts(chat_all(engine))
    result = job.future.result(timeout=300)
    assert len(result.images) == 2
    assert spy.most == 1, "two forwards ran on the device at once"
    assert together == alone
    image_steps = [t for name, t in spy.calls if name == "rfserve-worker"]
    chat_steps = [t for name, t in spy.calls if name == "rfserve-chat"]
    during = [t for t in chat_steps if image_steps[0] < t < image_steps[-1]]
    assert len(during) >= 10, "chat waited for the whole image batch instead of taking turns"
