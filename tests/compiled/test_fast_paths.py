"""Every family's fast path compiles on the CPU with inductor, `fullgraph=True` and `dynamic=False`, on the tiny
configs: no graph break, one graph per warm-up bucket and call, no recompile after capture, outputs equal to
eager (images within one 8-bit level; chat decode's greedy tokens exactly). The graphs' operations are checked
for the attention, so that a kernel dispatch that fell out of the graph shows."""
import base64
import io
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from rfserve.benchmarks.bench_compile import RecordedGraph, chat_case, graph_stats, image_case, recorded_graphs
from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.fast_path import Captured, CompiledCalls
from rfserve.model_zoo.registry import load_model, parse_spec
from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from tests.janusflow.greedy import greedy

pytestmark = pytest.mark.slow            # each compiles a few graphs: about half a minute each on 2 cores
BUCKETS = (1, 2)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models are all per-op overhead; two OpenMP threads on a shared CPU spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compiled_images_match_eager(fast, run, calls_per_bucket: int) -> list[RecordedGraph]:
    eager = {b: run(b)().images for b in BUCKETS}
    with recorded_graphs() as graphs:
        fast.prepare("default")
        for b in BUCKETS:
            for _ in range(2):
                run(b)()
        fast.finish_capture()
        stats = graph_stats()
        assert stats == {"graph_breaks": 0, "graphs": calls_per_bucket * len(BUCKETS)}
        out = {b: run(b)().images for b in BUCKETS}
        assert graph_stats() == stats                                  # the captured buckets never recompile
    for b in BUCKETS:
        assert out[b].shape == eager[b].shape
        assert np.abs(out[b].astype(int) - eager[b].astype(int)).max() <= 1
    return graphs


def _check_graphs(graphs: list[RecordedGraph]) -> None:
    """The attention is inside the graphs, and CUDA graphs would capture every one of them: none writes in place
    an input that is not static (a cache handed in fresh each call), holds an op they cannot, or lowers to one."""
    assert any("scaled_dot_product_attention" in op for g in graphs for op in g.ops)
    assert [g.cudagraph_blocker for g in graphs] == [None] * len(graphs)


def test_sd_unet_and_decoder(tiny_sd):
    graphs = _compiled_images_match_eager(*image_case(f"instaflow-0.9b={tiny_sd}"), calls_per_bucket=2)
    _check_graphs(graphs)


def test_sd_rows_joining_mid_way_run_the_captured_graphs(tiny_sd):
    """The per-row timesteps are inputs of the graph: a row that joins a running batch at another point of another
    schedule runs in the captured bucket of the batch's size, with no compile, and makes the image it makes
    eagerly alone. A row without guidance beside guided ones makes a forward of 3 rows, between the captured 2
    and 4: it runs in the graph for 4, padded."""
    pipe = load_model(parse_spec(f"instaflow-0.9b={tiny_sd}"), torch.device("cpu"), torch.float32).pipeline
    w, h = pipe.default_size
    first, joiner, plain = (ImageSpec(f"a red circle {s}", "", s, w, h, steps, g)
                            for s, steps, g in [(1, 4, 2.0), (2, 2, 2.0), (3, 2, 0.0)])
    eager = {spec.seed: pipe.run([spec]).images[0] for spec in (joiner, plain)}
    fast = pipe.fast_path()
    with recorded_graphs():
        fast.prepare("default")
        for b in BUCKETS:
            for _ in range(2):
                pipe.run([replace(first, seed=s) for s in range(b)])
        fast.finish_capture()
        stats = graph_stats()
        calls = pipe.parts.denoiser
        fast_calls = []
        calls.fast = _counting(calls.fast, fast_calls)
        made = {}
        for other in (joiner, plain):
            running = pipe.begin([first])
            pipe.step(running)
            pipe.admit(running, [other])                     # at step 2 of 4, a 2-step row joins
            while not running.finished():
                pipe.step(running)
            made[other.seed] = pipe.finish(running, running.finished()).images[0]
        assert graph_stats() == stats
        assert fast_calls == [2, 4, 4, 2, 4, 4]              # forward rows: the 3-row steps ran padded to 4
    for seed, image in made.items():
        assert np.abs(image.astype(int) - eager[seed].astype(int)).max() <= 1


def _counting(call, seen: list[int]):
    def counted(x, *args, **kwargs):
        seen.append(x.shape[0])
        return call(x, *args, **kwargs)
    return counted


def test_hunyuan_transformer(tmp_path_factory):
    from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan

    root = save_random_hunyuan(tmp_path_factory.mktemp("hunyuan"), "tiny", seed=0)
    fast, run = image_case(f"hunyuan-dit-v1.2={root}", steps=2)
    _check_graphs(_compiled_images_match_eager(fast, run, calls_per_bucket=1))


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory):
    from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("janusflow"), "tiny", seed=0)


def test_janusflow_flow_step(tiny_janus):
    fast, run = image_case(f"janusflow-1.3b={tiny_janus}", steps=2)
    _check_graphs(_compiled_images_match_eager(fast, run, calls_per_bucket=1))


@pytest.fixture(scope="module")
def tiny_janus_pro(tmp_path_factory):
    from rfserve.model_zoo.janus.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("janus-pro"), "tiny", seed=0)


def test_janus_pro_token_step(tiny_janus_pro):
    """Greedy, so that the compiled graph's rounding cannot move a sampled token."""
    fast, run = image_case(f"janus-pro-1b={tiny_janus_pro}?temperature=0")
    _check_graphs(_compiled_images_match_eager(fast, run, calls_per_bucket=1))


@pytest.mark.parametrize("preset, checkpoint", [("janusflow-1.3b", "tiny_janus"), ("janus-pro-1b", "tiny_janus_pro")])
def test_chat_decode_step(preset, checkpoint, request):
    """Every chat model's decode step: JanusFlow's, and Janus-Pro's over its bare Llama body."""
    capture, _ = chat_case(f"{preset}={request.getfixturevalue(checkpoint)}", slots=max(BUCKETS))
    decoder = capture.decoder
    vocab = decoder.lm.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(10, vocab, n)] for n in (5, 9)]
    eager = {b: greedy(decoder, prompts[:b], steps=6) for b in BUCKETS}
    with recorded_graphs() as graphs:
        capture.prepare("default")
        capture.finish_capture()
        stats = graph_stats()
        assert stats == {"graph_breaks": 0, "graphs": len(BUCKETS)}
        fast = {b: greedy(decoder, prompts[:b], steps=6) for b in BUCKETS}
        assert graph_stats() == stats
    width = 256 // decoder.page                                 # one width bucket: max_len 256 is the smallest
    assert decoder.step.shapes == {(torch.get_num_threads(), (b,), (b,), (b, width)) for b in BUCKETS}   # call_key
    assert fast == eager
    _check_graphs(graphs)


def test_engine_compiles_on_cpu_when_asked(tiny_janus):
    """`--compile on` on the CPU: warm-up captures JanusFlow's flow step per bucket and the chat decode step
    per bucket of slots before ready, through the pipeline's and the decoder's own fast paths; the images
    are those of an eager engine."""
    body = {"model": "janusflow-1.3b", "prompt": "a red circle", "num_inference_steps": 2, "seed": 3}
    images = {}
    for compile in ("off", "on"):
        config = ServerConfig(models=[f"janusflow-1.3b={tiny_janus}"], device="cpu", max_batch=2,
                              batch_buckets=(1, 2), compile=compile, cpu_threads=1)
        engine = Engine(config)
        engine.load(progress=False)
        try:
            model = engine.models["janusflow-1.3b"]
            flow_step = model.pipeline.flow_step
            if compile == "on":
                assert isinstance(flow_step, Captured) and not flow_step.capturing and len(flow_step.shapes) == 2
                step = engine.chat_batcher("janusflow-1.3b").decoder.step
                assert isinstance(step, Captured) and not step.capturing and step.shapes
            else:
                assert not isinstance(flow_step, Captured) and "janusflow-1.3b" not in engine.chat_batchers
            with TestClient(create_app(engine)) as client:
                r = client.post("/v1/images/generations", json=body)
                assert r.status_code == 200, r.text
                images[compile] = r.json()["data"][0]["b64_json"]
        finally:
            engine.shutdown()
    off, on = (np.asarray(Image.open(io.BytesIO(base64.b64decode(images[k])))).astype(int) for k in ("off", "on"))
    assert np.abs(off - on).max() <= 1


def test_sd_setup_takes_a_vae_without_attention():
    """rf-shapes' VAE has no attention: the SD fast path's setup routes the UNet's and leaves the VAE be."""
    from rfserve.kernels.processors import RfserveAttnProcessor
    from rfserve.model_zoo.registry import load_model, parse_spec

    pipe = load_model(parse_spec("rf-shapes"), torch.device("cpu"), torch.float32).pipeline
    pipe.fast_path().prepare(None)
    assert {type(m.processor) for m in pipe.parts.unet.modules() if hasattr(m, "processor")} == {RfserveAttnProcessor}
    assert not any(hasattr(m, "processor") for m in pipe.parts.vae.modules())
    assert not isinstance(pipe.parts.denoiser, Captured)                # no mode: nothing compiled


def test_capture_after_ready_keys_the_thread_count():
    """A graph guards on the intra-op thread count, one count for the whole process, which the CPU worker sets per
    batch. A call recorded at one count compiles at that count on the capture thread whatever the worker set
    last, then takes the graph at that count and runs eagerly at any other: no call compiles after capture."""
    owner = SimpleNamespace(call=lambda x: torch.nn.functional.gelu(x) * 2)
    fast, x = CompiledCalls([(owner, "call")]), torch.randn(4, 8)
    with recorded_graphs():
        fast.prepare("default", record=True)
        owner.call(x)                                               # not recording yet: nothing kept
        torch.set_num_threads(1)
        fast.record_calls(lambda: owner.call(x))
        torch.set_num_threads(2)                                    # the worker's count for another batch
        capture = threading.Thread(target=fast.capture_examples)
        capture.start()
        capture.join()
        captured, stats = owner.call, graph_stats()
        assert stats == {"graph_breaks": 0, "graphs": 1} and captured.shapes == {(1, (4, 8))}
        calls, compiled = [], captured.fast
        captured.fast = lambda *a: calls.append(torch.get_num_threads()) or compiled(*a)
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            torch.testing.assert_close(owner.call(x), captured.eager(x))
        assert calls == [1, 1] and graph_stats() == stats


def test_a_hot_call_captures_more_shapes_than_dynamos_default_limit():
    """Dynamo compiles one code object 8 times by default, across every instance; the chat step is captured per
    (row bucket, width bucket) for each chat model, well past that, and a fullgraph compile past the limit fails
    the capture. Twelve captured shapes of one call all compile and stay compiled."""
    owner = SimpleNamespace(call=lambda x: x * 2)
    fast = CompiledCalls([(owner, "call")])
    with recorded_graphs():
        fast.prepare("default")
        for n in range(1, 13):
            owner.call(torch.ones(n))
        fast.finish_capture()
        stats = graph_stats()
        assert stats == {"graph_breaks": 0, "graphs": 12}
        assert owner.call.shapes == {(torch.get_num_threads(), (n,)) for n in range(1, 13)}
        torch.testing.assert_close(owner.call(torch.ones(12)), torch.full((12,), 2.0))
        assert graph_stats() == stats


def test_cpu_default_captures_after_ready(tiny_sd):
    """`--compile auto` on the CPU, for a family whose fast path says so: ready comes after the eager warm-up
    alone, the shapes warm-up saw compile on a background thread while requests are served eagerly, and then
    switch over: a request takes the compiled graph, compiles nothing, and gets the eager engine's image."""
    body = {"model": "instaflow-0.9b", "prompt": "a red circle", "seed": 3}
    images = {}
    for compile in ("off", "auto"):
        engine = Engine(ServerConfig(models=[f"instaflow-0.9b={tiny_sd}"], device="cpu", max_batch=2,
                                     batch_buckets=(1, 2), compile=compile))
        with recorded_graphs() as graphs:
            engine.load(progress=False)
            try:
                parts = engine.models["instaflow-0.9b"].pipeline.parts
                with TestClient(create_app(engine)) as client:
                    if compile == "auto":
                        assert client.post("/v1/images/generations", json=body).status_code == 200  # meanwhile
                        assert engine.captured_later.wait(600)
                        assert [len(c.shapes) for c in (parts.denoiser, parts.vae_decode)] == [2, 2]
                        assert parts.denoiser.examples is None and not parts.denoiser.capturing
                        stats, calls, fast = graph_stats(), [], parts.denoiser.fast
                        parts.denoiser.fast = lambda *a, **k: calls.append(1) or fast(*a, **k)
                    else:
                        assert not isinstance(parts.denoiser, Captured) and engine.captured_later.is_set()
                    r = client.post("/v1/images/generations", json=body)
                    assert r.status_code == 200, r.text
                    images[compile] = r.json()["data"][0]["b64_json"]
                    if compile == "auto":
                        assert calls and graph_stats() == stats
                        _check_graphs(graphs)
            finally:
                engine.shutdown()
    off, on = (np.asarray(Image.open(io.BytesIO(base64.b64decode(images[k])))).astype(int) for k in ("off", "auto"))
    assert np.abs(off - on).max() <= 1


def test_chat_paged_step_captures_rows_by_widths_and_serving_never_recompiles(tiny_janus):
    """The paged decode step on the CPU (torch twin): one graph per (row bucket, width bucket), widths powers of
    two of blocks from 256 tokens. Streams served through the batcher (admissions, a sequence growing past 256
    tokens into the wider bucket, one leaving) take only captured graphs and choose the eager tokens."""
    from rfserve.model_zoo.registry import load_model, parse_spec
    from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher
    from tests.janusflow.test_chat_batcher import Collector

    chat = load_model(parse_spec(f"janusflow-1.3b={tiny_janus}"), torch.device("cpu"), torch.float32).chat
    decoder = chat.decoder(2, 512)
    vocab = decoder.lm.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(10, vocab, n)] for n in (250, 10, 30)]

    def serve() -> list[list[int]]:
        batcher = ContinuousBatcher(decoder, chat.tokenizer, eos_id=-1).start()
        seqs = [ChatSequence(ids, None, [], n, 0.0, 1.0, [], None, Collector()) for ids, n in zip(prompts, (12, 4, 6))]
        try:
            for seq in seqs:
                batcher.submit(seq)
            for seq in seqs:
                assert seq.emit.done.wait(120)
        finally:
            batcher.close()
        return [seq.generated for seq in seqs]

    eager = serve()
    fast = decoder.fast_path(BUCKETS)
    assert decoder.width_buckets == (16, 32)
    with recorded_graphs() as graphs:
        fast.prepare("default")
        decoder.capture()
        fast.finish_capture()
        stats = graph_stats()
        assert stats == {"graph_breaks": 0, "graphs": len(BUCKETS) * 2}
        assert serve() == eager
        assert graph_stats() == stats
    assert decoder.step.shapes == {(torch.get_num_threads(), (b,), (b,), (b, w)) for b in BUCKETS for w in (16, 32)}
    _check_graphs(graphs)
