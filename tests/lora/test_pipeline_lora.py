"""The SD pipelines with per-row LoRA adapters (issue #34, phase 2): each row of a mixed batch (adapters a, none, b,
a+b with scales, a row without guidance, and a UNet-only adapter) gives, within 1e-5 on float images, what the
same spec gives alone through our pipeline built on diffusers' own pipeline with that adapter mix loaded
(`load_lora_weights` + `set_adapters`, UNet and text encoder) and no pool; rows without adapters give the base
pipeline's. A row joining mid-way with another adapter gives what it gives alone; pins follow the rows."""
import copy
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import PoolConfig
from tests.lora.adapters import SPECS, make

ATOL = 1e-5
FAMILIES = ["instaflow", "perflow"]


def _load(family, tiny_sd):
    if family == "instaflow":
        from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
        return InstaFlowPipeline.from_pretrained(tiny_sd)
    from rfserve.model_zoo.perflow.pipeline import PeRFlowPipeline
    return PeRFlowPipeline.from_pretrained(tiny_sd)


@pytest.fixture(scope="module")
def made(tiny_sd, tmp_path_factory):
    base = _load("instaflow", tiny_sd)
    folder = tmp_path_factory.mktemp("pipeline-loras")
    return {name: make(spec, base.parts.unet, base.parts.text_encoder, folder, seed=i + 11)
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.fixture(scope="module", params=FAMILIES)
def pipes(request, tiny_sd, made):
    """(family, the base pipeline, the same with a pool and adapters a, b, c registered from kohya files)."""
    base = _load(request.param, tiny_sd)
    pooled = _load(request.param, tiny_sd)
    pooled.enable_lora(PoolConfig(slots=3, max_rank=4, max_rows=16))
    for name in ("a", "b", "c"):
        pooled.register_lora(name, load_lora(made[name].kohya_file))
    return request.param, base, pooled


def reference(family, tiny_sd, made, choice):
    """Our pipeline on the UNet and text encoder of a diffusers pipeline that loaded the adapters of `choice`
    from their diffusers-format files and set them with its scales; no pool."""
    pipe = _load(family, tiny_sd)
    p = pipe.parts
    sd = StableDiffusionPipeline(vae=p.vae, text_encoder=copy.deepcopy(p.text_encoder), tokenizer=p.tokenizer,
                                 unet=copy.deepcopy(p.unet), scheduler=DDIMScheduler(), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    for name, _ in choice:
        sd.load_lora_weights(str(made[name].diffusers_dir), adapter_name=name)
    sd.set_adapters([n for n, _ in choice], [s for _, s in choice])
    return type(pipe)(replace(p, unet=sd.unet, text_encoder=sd.text_encoder))


def specs(pipe):
    w, h = pipe.default_size
    one = ImageSpec("a red square on blue", "blurry", 0, w, h, 3, 3.0)
    # Rows 0-2 share the prompt: a text cache keyed by the prompt alone would give them one embedding.
    return [replace(one, seed=1, lora=(("a", 1.0),)),
            replace(one, seed=2),
            replace(one, seed=3, lora=(("b", 0.8),)),
            replace(one, prompt="two green circles", seed=4, guidance=1.0, lora=(("a", 0.7), ("b", -0.5))),
            replace(one, prompt="a yellow star", seed=5, lora=(("c", 1.2),))]


def test_mixed_batch_rows_equal_each_spec_alone_with_diffusers_loaded_adapters(pipes, tiny_sd, made):
    family, base, pooled = pipes
    batch = specs(pooled)
    mixed, _ = pooled.images(batch)
    for i, spec in enumerate(batch):
        plain = base.images([replace(spec, lora=())])[0]
        want = reference(family, tiny_sd, made, spec.lora).images([replace(spec, lora=())])[0] if spec.lora \
            else plain
        if spec.lora:
            assert (want - plain).abs().max() > 1e-3, f"row {i}: the adapter must change the image"
        torch.testing.assert_close(mixed[i:i + 1], want, atol=ATOL, rtol=0, msg=f"row {i} {spec.lora} ({family})")
    assert not any(pooled.adapters.denoiser._pins.values()), "every row left: no slot stays pinned"


def test_a_row_joining_midway_with_another_adapter_equals_it_alone(pipes, tiny_sd, made):
    family, base, pooled = pipes
    w, h = pooled.default_size
    first = ImageSpec("a red square on blue", "", 7, w, h, 3, 2.5, lora=(("b", 1.1),))
    joiner = ImageSpec("a red square on blue", "", 8, w, h, 3, 2.5, lora=(("a", 0.9), ("c", 0.6)))
    running = pooled.begin([first])
    pooled.step(running)
    pooled.admit(running, [joiner])
    pins = pooled.adapters.denoiser._pins
    resident = pooled.adapters.denoiser.resident()
    assert {resident[n]: pins[resident[n]] for n in "abc"} == {resident[n]: 1 for n in "abc"}
    with pytest.raises(RuntimeError, match="in use"):
        pooled.unregister_lora("a")
    got, order = [], []
    while len(running):
        done = running.finished()
        if done:
            order += [running.specs[i] for i in done]
            got.append(pooled.decoded(running, done))
        else:
            pooled.step(running)
    assert order == [first, joiner]
    for spec, image in zip(order, torch.cat(got)):
        want = reference(family, tiny_sd, made, spec.lora).images([replace(spec, lora=())])[0]
        torch.testing.assert_close(image[None], want, atol=ATOL, rtol=0, msg=f"{spec.lora} ({family})")
    assert not any(pins.values())


def test_a_row_that_leaves_unpins_its_adapters_and_they_can_be_unloaded(pipes, made):
    _, _, pooled = pipes
    w, h = pooled.default_size
    spec = ImageSpec("x", "", 1, w, h, 3, 1.0)
    running = pooled.begin([replace(spec, lora=(("a", 1.0),)), replace(spec, lora=(("a", 0.5), ("b", 1.0))),
                            spec])
    pins = pooled.adapters.denoiser._pins
    a, b = (pooled.adapters.denoiser.resident()[n] for n in "ab")
    assert (pins[a], pins[b]) == (2, 1)
    running.leave([1])
    assert (pins[a], pins[b]) == (1, 0)
    pooled.step(running)
    running.keep([1])
    assert (pins[a], pins[b]) == (0, 0)
    pooled.unregister_lora("a")
    try:
        assert "a" not in pooled.lora_names()
        with pytest.raises(KeyError, match="'a'"):
            pooled.begin([replace(spec, lora=(("a", 1.0),))])
    finally:
        pooled.register_lora("a", load_lora(made["a"].kohya_file))


def test_a_batch_dropped_without_its_rows_leaving_unpins_them(pipes):
    import gc

    _, _, pooled = pipes
    w, h = pooled.default_size
    spec = ImageSpec("x", "", 1, w, h, 3, 1.0, lora=(("b", 1.0),))
    pins = pooled.adapters.denoiser._pins
    running = pooled.begin([spec])
    pooled.admit(running, [spec])
    pooled.step(running)
    b = pooled.adapters.denoiser.resident()["b"]
    assert pins[b] == 2
    del running
    gc.collect()
    assert pins[b] == 0


def test_text_cache_keys_the_adapter_choice(pipes):
    _, base, pooled = pipes
    w, h = pooled.default_size
    spec = ImageSpec("a red square on blue", "", 1, w, h, 3, 1.0)
    plain = base.encode_prompts([spec.prompt], [spec])[0]
    rows = [spec, replace(spec, lora=(("a", 1.0),)), replace(spec, lora=(("a", 0.5),)),
            replace(spec, lora=(("c", 1.0),))]
    emb, _ = pooled.encode_prompts([s.prompt for s in rows], rows)
    torch.testing.assert_close(emb[0:1], plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(emb[3:4], plain, atol=ATOL, rtol=0)          # c leaves the text encoder alone
    assert (emb[1] - plain[0]).abs().max() > 1e-3 and (emb[1] - emb[2]).abs().max() > 1e-3


def test_adapters_never_split_batches():
    spec = ImageSpec("p", "", 0, 64, 64, 4, 2.0)
    other = replace(spec, lora=(("a", 1.0),))
    assert spec.join_key() == other.join_key()
    assert spec.batch_key() == other.batch_key() == replace(other, lora=(("a", 0.5),)).batch_key()
    assert hash(other) != hash(spec)


def test_an_adapter_registered_again_under_its_name_is_not_served_from_the_text_cache(tiny_sd, made):
    pipe = _load("instaflow", tiny_sd)
    pipe.enable_lora(PoolConfig(slots=2, max_rank=4, max_rows=4))
    pipe.register_lora("x", load_lora(made["a"].diffusers_dir))
    w, h = pipe.default_size
    spec = ImageSpec("a red square on blue", "", 1, w, h, 3, 1.0, lora=(("x", 1.0),))
    before = pipe.encode_prompts([spec.prompt], [spec])[0]
    pipe.unregister_lora("x")
    pipe.register_lora("x", load_lora(made["b"].diffusers_dir))
    after = pipe.encode_prompts([spec.prompt], [spec])[0]
    assert (after - before).abs().max() > 1e-3
    want = reference("instaflow", tiny_sd, made, (("b", 1.0),)).encode_prompts([spec.prompt], [replace(spec, lora=())])
    torch.testing.assert_close(after, want[0], atol=ATOL, rtol=0)


def test_the_fast_paths_setup_keeps_each_rows_adapters(tiny_sd, made):
    """The fast path's setup (channels_last, our attention processors calling the wrapped to_q/to_k/to_v) on a
    pipeline with a pool: rows still equal the reference given the same setup."""
    pipe = _load("instaflow", tiny_sd)
    pipe.enable_lora(PoolConfig(slots=2, max_rank=4, max_rows=8))
    for name in ("a", "b"):
        pipe.register_lora(name, load_lora(made[name].diffusers_dir))
    pipe.fast_path().prepare(None)
    batch = [s for s in specs(pipe) if "c" not in dict(s.lora)]
    mixed, _ = pipe.images(batch)
    for i, spec in enumerate(batch):
        ref = reference("instaflow", tiny_sd, made, spec.lora) if spec.lora else _load("instaflow", tiny_sd)
        ref.fast_path().prepare(None)
        want = ref.images([replace(spec, lora=())])[0]
        torch.testing.assert_close(mixed[i:i + 1], want, atol=ATOL, rtol=0, msg=f"row {i} {spec.lora}")
