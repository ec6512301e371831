"""The serving contract of the Hunyuan-DiT pipeline: batch invariance (a row computes what it computes alone,
whatever steps, guidance, strength and schedule its neighbours have, whenever it joins and whoever leaves),
seeds, caches, card and checkpoint errors, loaded through the registry as the server loads it."""
import shutil

import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import ImageSpec, parse_size
from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
from rfserve.model_zoo.hunyuan_dit.components import HunyuanComponents
from rfserve.model_zoo.hunyuan_dit.geometry import SUPPORTED_SHAPES, rotary_tables, supported_sizes
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.registry import load_model, parse_spec
from rfserve.model_zoo.sd_components import to_uint8
from rfserve.model_zoo.seeding import initial_noise, seeded_noise
from tests.hunyuan_dit.stepping import rest_of
from tests.server.photo import photo_like


@pytest.fixture(scope="module")
def loaded(tiny_hunyuan):
    return load_model(parse_spec(f"hunyuan-dit-v1.2={tiny_hunyuan}"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pipe(loaded):
    return loaded.pipeline


def test_card_has_the_ten_shapes_scaled_to_the_checkpoint(loaded):
    card = loaded.card
    assert card.family == "hunyuan-dit" and card.max_prompt_tokens == 77
    assert (card.defaults.steps, card.defaults.guidance) == (50, 5.0)
    assert len(card.sizes) == 10 and card.defaults.size == "128x128" == card.sizes[0]
    for size, (w, h) in zip(card.sizes, SUPPORTED_SHAPES):
        sw, sh = parse_size(size)
        assert sw % 16 == 0 and sh % 16 == 0
        assert abs(sw / sh - w / h) < 0.1      # the aspect survives the snap to the 16-px grid


def test_a_published_checkpoint_gets_exactly_the_reference_shapes():
    assert supported_sizes(128) == tuple(f"{w}x{h}" for w, h in SUPPORTED_SHAPES)


def test_distilled_preset_defaults(tiny_hunyuan):
    card = load_model(parse_spec(f"hunyuan-dit-v1.2-distilled={tiny_hunyuan}"), torch.device("cpu"),
                      torch.float32).card
    assert (card.defaults.steps, card.defaults.guidance) == (25, 5.0)


def test_alone_equals_position_2_of_4(pipe):
    w, h = 160, 96
    target = ImageSpec("a green triangle", "", 1234, w, h, 3, 5.0)
    alone, _ = pipe.images([target])
    others = [ImageSpec(f"prompt {i}", "blurry", 99 + i, w, h, 3, 3.0 + i) for i in range(3)]
    together, _ = pipe.images(others[:2] + [target] + others[2:])
    assert torch.allclose(alone[0], together[2], atol=1e-5), (alone[0] - together[2]).abs().max()
    assert not torch.allclose(together[1], together[2], atol=1e-3)


W, H = 160, 96
MASK = np.zeros((H, W), np.float32)
MASK[:, : W // 2] = 1                              # the left half may change


def alone(pipe, spec: ImageSpec) -> torch.Tensor:
    """`spec` by itself, (3, H, W) in [0, 1]: the float path the tests compare rounds to `Stepped.run`'s pixels."""
    image = pipe.images([spec])[0][0]
    assert np.array_equal(to_uint8(image[None])[0][0], pipe.run([spec]).images[0])
    return image


def assert_as_alone(pipe, specs: list[ImageSpec], images: list[torch.Tensor]) -> None:
    """Each of `images` is what its spec makes alone; and they are different pictures, not a degenerate output."""
    for spec, image in zip(specs, images):
        err = (alone(pipe, spec) - image).abs().max().item()
        assert err <= 1e-5, (spec, err)
    for a, b in zip(images, images[1:]):
        assert (a - b).abs().max() > 1e-2


def edit(prompt: str, seed: int, steps: int, guidance: float, strength: float, mask=None) -> ImageSpec:
    return ImageSpec(prompt, "blurry", seed, W, H, steps, guidance, strength, photo_like(H, W, seed), mask)


MIXED = [ImageSpec("a green triangle", "", 1234, W, H, 4, 5.0),
         ImageSpec("a red circle", "blurry", 7, W, H, 2, 1.0),       # no CFG: no unconditional branch
         ImageSpec("a blue square", "blurry", 8, W, H, 6, 3.0),
         ImageSpec("a cat", "", 9, W, H, 3, 7.5)]


@pytest.mark.parametrize("scheduler,rescale", [("ddpm", 0.0), ("dpm", 0.7), ("ddim", 0.0)])
def test_rows_of_other_steps_guidance_and_cfg_leave_a_row_as_alone(tiny_hunyuan, scheduler, rescale):
    """Each row's own scheduler at its own step count (DDPM's per-image variance noise, DPM's multistep
    history), its own timestep and guidance in the shared forward, and the rescale per image."""
    pipe = HunyuanPipeline.from_pretrained(tiny_hunyuan, scheduler=scheduler, guidance_rescale=rescale)
    assert_as_alone(pipe, MIXED, list(pipe.images(MIXED)[0]))


def test_previews_are_each_rows_own(pipe):
    """x̂₀ at each row's own timestep of its own schedule, within one level of the row's preview alone."""
    running = pipe.begin(MIXED)
    for _ in range(2):
        pipe.step(running)
    together = pipe.preview(running, [3, 0, 2])
    for got, spec in zip(together, [MIXED[3], MIXED[0], MIXED[2]]):
        single = pipe.begin([spec])
        for _ in range(2):
            pipe.step(single)
        assert np.abs(got.astype(int) - pipe.preview(single, [0])[0].astype(int)).max() <= 1
    assert np.abs(together[0].astype(int) - together[1].astype(int)).max() > 2


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm"])
def test_edits_of_other_strengths_and_masks_leave_an_edit_as_alone(tiny_hunyuan, scheduler):
    """Each edit runs its own share of its own schedule (DPM told where it begins), from its own input; an
    unmasked row beside a masked one is held nowhere."""
    pipe = HunyuanPipeline.from_pretrained(tiny_hunyuan, scheduler=scheduler)
    specs = [edit("a red circle", 3, 4, 5.0, 0.5), edit("a cat", 4, 6, 1.0, 0.75, MASK),
             edit("a dog", 5, 3, 3.0, 1.0), edit("a blue square", 6, 5, 4.0, 0.4, MASK)]
    assert_as_alone(pipe, specs, list(pipe.images(specs)[0]))


@pytest.mark.parametrize("edits", [False, True])
def test_rows_that_join_after_k_steps_compute_what_they_compute_alone(pipe, edits):
    """Joiners take their first step with the batch's next, at their own first timestep; an edit batch joins a
    masked row to unmasked ones."""
    if edits:
        first, joiners = [edit("a red circle", 3, 5, 5.0, 0.8), edit("a cat", 4, 3, 1.0, 0.6)], \
            [edit("a dog", 5, 4, 3.0, 0.7, MASK), edit("a blue square", 6, 2, 4.0, 1.0)]
    else:
        first, joiners = MIXED[:2], MIXED[2:]
    running = pipe.begin(first)
    for _ in range(2):
        pipe.step(running)
    pipe.admit(running, joiners)
    assert running.done == [2, 2, 0, 0]
    assert_as_alone(pipe, first + joiners, rest_of(pipe, running))


@pytest.mark.parametrize("edits", [False, True])
def test_rows_released_mid_way_leave_the_others_as_alone(pipe, edits):
    specs = [edit(f"a cat {i}", 10 + i, 3 + i, 5.0 - i, 0.9, MASK if i % 2 else None) for i in range(4)] \
        if edits else MIXED
    running = pipe.begin(specs)
    pipe.step(running)
    running.keep([3, 1])
    pipe.step(running)
    running.keep([1])                                  # a masked edit, among the edits
    assert_as_alone(pipe, [specs[1]], rest_of(pipe, running))


def test_initial_noise_is_the_seeding_contract():
    noise, generators = seeded_noise([5, 6], (4, 12, 20), dtype=torch.float32, device="cpu")
    for row, seed in zip(noise, [5, 6]):         # image i: its own generator, one (1, C, h, w) draw
        assert torch.equal(row, torch.randn((1, 4, 12, 20), generator=torch.Generator().manual_seed(seed))[0])
    assert torch.equal(noise, initial_noise([5, 6], (4, 12, 20), dtype=torch.float32, device="cpu"))
    # The generators continue past the initial draw, for DDPM's per-step variance noise.
    fresh = torch.Generator().manual_seed(6)
    torch.randn((1, 4, 12, 20), generator=fresh)
    assert torch.equal(torch.randn(3, generator=generators[1]), torch.randn(3, generator=fresh))


def test_negative_prompt_is_encoded_once(tiny_hunyuan):
    parts = HunyuanComponents.load(tiny_hunyuan)
    calls, encode = [], parts.encode_text
    parts.encode_text = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    pipe = HunyuanPipeline(parts)
    for prompt in ("a cat", "a dog"):
        pipe.images([ImageSpec(prompt, "", 1, 128, 128, 1, 5.0)])
    assert calls == [["a cat"], [""], ["a dog"]]


def test_rotary_tables_are_cached_per_shape():
    a = rotary_tables(160, 96, 16, 2, 8, torch.device("cpu"))
    assert rotary_tables(160, 96, 16, 2, 8, torch.device("cpu")) is a
    assert a[0].shape == (10 * 6, 16)                 # (h·w grid tokens, head_dim)
    assert rotary_tables(96, 160, 16, 2, 8, torch.device("cpu")) is not a


def test_run_returns_uint8_flags_and_stage_timings(pipe):
    long = "red " * 100                                # 100 BERT tokens > 77, fewer than 256 for mT5
    out = pipe.run([ImageSpec(long, "", 1, 128, 96, 2, 5.0), ImageSpec("red", "", 2, 128, 96, 2, 5.0)])
    assert out.prompt_truncated == [True, False]
    assert out.images.shape == (2, 96, 128, 3) and out.images.dtype == np.uint8
    assert set(out.timings) == {"encode", "sample", "decode"}


def test_size_off_the_16_px_grid_is_refused(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.images([ImageSpec("x", "", 1, 120, 128, 1, 5.0)])


def test_unknown_scheduler_option_is_a_checkpoint_error(tiny_hunyuan):
    with pytest.raises(CheckpointError, match="scheduler must be one of"):
        load_model(parse_spec(f"hunyuan-dit-v1.2={tiny_hunyuan}?scheduler=euler"), torch.device("cpu"),
                   torch.float32)


@pytest.mark.parametrize("remove,named", [
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"),
    ("text_encoder_2/config.json", "text_encoder_2/config.json"),
    ("tokenizer_2/tokenizer.json", "tokenizer_2/spiece.model"),     # the published file is named
])
def test_missing_file_is_named(tiny_hunyuan, tmp_path, remove, named):
    root = shutil.copytree(tiny_hunyuan, tmp_path / "ckpt")
    (root / remove).unlink()
    with pytest.raises(CheckpointError, match="^missing file: ") as err:
        load_model(parse_spec(f"hunyuan-dit-v1.2={root}"), torch.device("cpu"), torch.float32)
    assert str(err.value) == f"missing file: {root / named}"


def test_malformed_config_is_named(tiny_hunyuan, tmp_path):
    root = shutil.copytree(tiny_hunyuan, tmp_path / "ckpt")
    (root / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed file: .*scheduler_config.json"):
        load_model(parse_spec(f"hunyuan-dit-v1.2={root}"), torch.device("cpu"), torch.float32)
