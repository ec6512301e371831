"""Hunyuan-DiT with per-row LoRA adapters (issue #34): each row of a mixed batch (adapter x, none, y, x+y at other
scales without guidance) ends, within 1e-5 in latents, where diffusers' HunyuanDiTPipeline ends with that row's
adapters injected by peft into its transformer and weighted as `set_adapters` weights them (diffusers has no
Hunyuan-DiT LoRA loader), same seed, fp32 on CPU; a row without adapters where the base pipeline ends. A row joining
mid-way does the same; pins follow the rows; the compiled denoiser, padded between its captured buckets, serves
new bindings without recompiling; and a file with layers of another component is refused."""
from dataclasses import replace

import pytest
import torch
from diffusers import HunyuanDiTPipeline

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import PoolConfig
from tests.hunyuan_dit.stepping import latents, rest_of
from tests.lora.adapters import TRANSFORMER_SPECS, make_transformer, with_adapters
from tests.threads import torch_threads

ATOL = 1e-5
POOL = PoolConfig(slots=2, max_rank=4, max_rows=16)     # the transformer's own targets


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As tests/hunyuan_dit's (tests.threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_random_hunyuan(tmp_path_factory.mktemp("hunyuan-lora"), "tiny", seed=0)


@pytest.fixture(scope="module")
def diffusers_pipe(root):
    pipe = HunyuanDiTPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def made(diffusers_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunyuan-loras")
    return {name: make_transformer(name, config, diffusers_pipe.transformer, folder, seed=i + 5)
            for i, (name, config) in enumerate(TRANSFORMER_SPECS.items())}


def pooled(root, made) -> HunyuanPipeline:
    pipe = HunyuanPipeline.from_pretrained(root)
    pipe.enable_lora(POOL)
    for name in made:
        pipe.register_lora(name, load_lora(made[name].folder))
    return pipe


@pytest.fixture(scope="module")
def pipe(root, made):
    return pooled(root, made)


@pytest.fixture(scope="module")
def reference(diffusers_pipe, made):
    """Final latents (1, C, h, w) of a spec run by diffusers with the spec's adapters in its transformer, memoised."""
    done = {}

    def run(spec: ImageSpec) -> torch.Tensor:
        if spec not in done:
            transformer = with_adapters(diffusers_pipe.transformer, made, spec.lora) if spec.lora \
                else diffusers_pipe.transformer
            pipe = HunyuanDiTPipeline(**{**diffusers_pipe.components, "transformer": transformer})
            pipe.set_progress_bar_config(disable=True)
            done[spec] = pipe(spec.prompt, height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                              guidance_scale=spec.guidance, negative_prompt=spec.negative_prompt,
                              generator=[torch.Generator().manual_seed(spec.seed)], output_type="latent",
                              use_resolution_binning=False).images
        return done[spec]

    return run


def specs(pipe) -> list[ImageSpec]:
    w, h = pipe.default_size
    one = ImageSpec("a red square on blue", "blurry", 0, w, h, 3, 5.0)
    # Rows 0-2 share the prompt and guidance: only their adapters (and seeds) tell them apart.
    return [replace(one, seed=1, lora=(("x", 1.0),)),
            replace(one, seed=2),
            replace(one, seed=3, lora=(("y", 0.8),)),
            replace(one, prompt="two green circles", seed=4, guidance=1.0, lora=(("x", 0.7), ("y", -0.5)))]


def test_mixed_batch_rows_equal_diffusers_with_each_rows_adapters(pipe, reference):
    batch = specs(pipe)
    mixed = rest_of(pipe, pipe.begin(batch), latents)
    for i, spec in enumerate(batch):
        want = reference(spec)
        if spec.lora:
            assert (want - reference(replace(spec, lora=()))).abs().max() > 1e-2, f"row {i}: the adapter counts"
        torch.testing.assert_close(mixed[i], want, atol=ATOL, rtol=0, msg=f"row {i} {spec.lora}")
    assert not any(pipe.adapters.denoiser._pins.values()), "every row left: no slot stays pinned"


def test_a_row_joining_midway_with_other_adapters_equals_it_alone(pipe, reference):
    w, h = pipe.default_size
    first = ImageSpec("a red square on blue", "", 7, w, h, 3, 4.0, lora=(("y", 1.1),))
    joiner = ImageSpec("a cat on a mat", "", 8, w, h, 3, 4.0, lora=(("x", 0.9), ("y", 0.6)))
    running = pipe.begin([first])
    pipe.step(running)
    pipe.admit(running, [joiner])
    pins, resident = pipe.adapters.denoiser._pins, pipe.adapters.denoiser.resident()
    assert (pins[resident["x"]], pins[resident["y"]]) == (1, 2)
    with pytest.raises(RuntimeError, match="in use"):
        pipe.unregister_lora("x")
    got = rest_of(pipe, running, latents)
    for spec, x in zip([first, joiner], got):
        torch.testing.assert_close(x, reference(spec), atol=ATOL, rtol=0, msg=str(spec.lora))
    assert not any(pins.values())


def test_rows_that_leave_unpin_their_adapters(pipe, made):
    w, h = pipe.default_size
    spec = ImageSpec("x", "", 1, w, h, 3, 1.0)
    running = pipe.begin([replace(spec, lora=(("x", 1.0),)), replace(spec, lora=(("x", 0.5), ("y", 1.0))), spec])
    pins, resident = pipe.adapters.denoiser._pins, pipe.adapters.denoiser.resident()
    x, y = resident["x"], resident["y"]
    assert (pins[x], pins[y]) == (2, 1)
    running.leave([1])
    assert (pins[x], pins[y]) == (1, 0)
    pipe.step(running)
    running.keep([1])
    assert (pins[x], pins[y]) == (0, 0)
    pipe.unregister_lora("y")
    try:
        assert pipe.lora_names() == ["x"]
        with pytest.raises(KeyError, match="'y'"):
            pipe.begin([replace(spec, lora=(("y", 1.0),))])
    finally:
        pipe.register_lora("y", load_lora(made["y"].folder))


def test_only_transformer_layers_are_served(pipe, made):
    lora = load_lora(made["x"].folder)
    assert set(lora.components) == {"transformer"}
    for other in ("text_encoder", "unet"):
        with pytest.raises(ValueError, match=f"layers for the {other}, which this model lacks"):
            pipe.register_lora("z", replace(lora, components={**lora.components, other: {}}))
    assert "z" not in pipe.lora_names()


def test_without_lora_enabled_rows_asking_for_adapters_are_refused(root):
    plain = HunyuanPipeline.from_pretrained(root)
    w, h = plain.default_size
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.begin([ImageSpec("x", "", 1, w, h, 3, 5.0, lora=(("x", 1.0),))])
    with pytest.raises(ValueError, match="no text-encoder LoRA"):
        plain.enable_lora(POOL, text_config=POOL)
    assert plain.adapters is None and plain.lora_names() == []


def test_compiled_denoiser_padded_between_buckets_serves_new_bindings(root, made, reference, monkeypatch):
    """The fast path's compiled transformer (traced by dynamo, run by its eager backend to keep the CPU time low),
    captured for a 4-row forward, runs a 3-row forward (one guided row, one not) padded to it, with other adapters
    bound, without compiling again; each row still ends where diffusers' does."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode, **kw: compile_(fn, backend=counter, **kw))
    torch._dynamo.reset()
    pipe = pooled(root, made)
    fast = pipe.fast_path()
    fast.prepare("default")
    warm = specs(pipe)[:2]                                       # two guided rows: 4 forward rows
    rest_of(pipe, pipe.begin(warm), latents)
    fast.finish_capture()
    assert counter.frame_count == 1
    captured, rows = pipe.parts.denoiser, []
    graph = captured.fast
    captured.fast = lambda x, *args, **kwargs: (rows.append(len(x)), graph(x, *args, **kwargs))[1]
    batch = [specs(pipe)[2], specs(pipe)[3]]                     # y guided, x+y unguided: 3 forward rows
    got = rest_of(pipe, pipe.begin(batch), latents)
    assert rows == [4, 4, 4], "each step's 3 rows ran on the captured graph, padded to its 4"
    assert counter.frame_count == 1, "and nothing compiled again"
    for spec, x in zip(batch, got):
        torch.testing.assert_close(x, reference(spec), atol=ATOL, rtol=0, msg=str(spec.lora))
