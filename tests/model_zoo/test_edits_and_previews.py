"""Edits and previews in each family's own terms, on the tiny checkpoints: an edit of strength 1 is
text-to-image, one near 0 is the input through the VAE, a mask keeps the input's pixels, an edit does not
depend on its batch, and the preview formula (each family's x̂) lands on the image at the last step."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.edits import vae_latents
from rfserve.model_zoo.sd_components import to_uint8
from tests.server.photo import photo_like

STEPS = 6


def _instaflow(tiny_sd, _):
    from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
    return InstaFlowPipeline.from_pretrained(tiny_sd)


def _perflow(tiny_sd, _):
    from rfserve.model_zoo.perflow.pipeline import PeRFlowPipeline
    return PeRFlowPipeline.from_pretrained(tiny_sd)


def _hunyuan(_, folder):
    from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan
    from rfserve.model_zoo.hunyuan_dit.pipeline import HunyuanPipeline
    return HunyuanPipeline.from_pretrained(save_random_hunyuan(folder, "tiny", seed=0))


def _rf_shapes(*_):
    """The shipped model: its trained VAE returns channels-last latents, unlike the tiny random one."""
    from rfserve.model_zoo.registry import load_model, parse_spec
    return load_model(parse_spec("rf-shapes-2rf"), torch.device("cpu"), torch.float32).pipeline


FAMILIES = {"instaflow": _instaflow, "perflow": _perflow, "hunyuan-dit": _hunyuan, "rf-shapes": _rf_shapes}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipe(request, tiny_sd, tmp_path_factory):
    return FAMILIES[request.param](tiny_sd, tmp_path_factory.mktemp(request.param))


def spec(pipe, seed: int, **edit) -> ImageSpec:
    w, h = pipe.default_size
    return ImageSpec(f"a red circle {seed}", "", seed, w, h, STEPS, 2.0, **edit)


def photo(pipe, seed: int = 0) -> np.ndarray:
    w, h = pipe.default_size
    return photo_like(h, w, seed)


@pytest.mark.parametrize("threads", [1, 2])
def test_strength_one_is_text_to_image(pipe, threads):
    """On any thread count: there the kernels' rounding depends on the latents' memory layout too."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t2i, _ = pipe.images([spec(pipe, 3)])                   # floats: any rounding difference shows
        edit, _ = pipe.images([spec(pipe, 3, strength=1.0, image=photo(pipe))])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(edit, t2i)


def test_strength_zero_returns_the_input_through_the_vae(pipe):
    image = photo(pipe)
    out = pipe.run([spec(pipe, 3, strength=0.0, image=image)]).images[0]
    with torch.inference_mode():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        round_trip = to_uint8(pipe.parts.decode(vae_latents(pipe.parts.vae, pixels)))[0][0]
    assert np.abs(out.astype(int) - round_trip.astype(int)).max() <= 1
    assert not np.array_equal(out, pipe.run([spec(pipe, 3, strength=0.6, image=image)]).images[0])


def test_a_mask_keeps_the_input_outside_it(pipe):
    image = photo(pipe)
    mask = np.zeros(image.shape[:2], np.float32)
    mask[:, : image.shape[1] // 2] = 1.0                                   # the left half may change
    out = pipe.run([spec(pipe, 3, strength=0.8, image=image, mask=mask)]).images[0]
    right = slice(image.shape[1] // 2, None)
    assert np.array_equal(out[:, right], image[:, right])
    free = pipe.run([spec(pipe, 3, strength=0.8, image=image)]).images[0]
    assert not np.array_equal(out[:, : image.shape[1] // 2], image[:, : image.shape[1] // 2])
    assert not np.array_equal(free[:, right], image[:, right])


def test_an_edit_is_the_same_alone_and_batched(pipe):
    """Within one level, as text-to-image: the tiny Hunyuan-DiT's convolutions round differently by batch."""
    edits = [spec(pipe, s, strength=0.7, image=photo(pipe, s)) for s in (1, 2, 3)]
    batched = pipe.run(edits).images
    for i, one in enumerate(edits):
        assert np.abs(batched[i].astype(int) - pipe.run([one]).images[0].astype(int)).max() <= 1


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_preview_at_the_last_step_is_the_image(pipe, strength):
    """Each family's clean estimate is a real x̂: after the last step there is nothing left to run, so the
    preview taken there decodes to the image itself. Earlier previews are pictures of the same size."""
    one = spec(pipe, 5, strength=strength, image=photo(pipe) if strength < 1 else None)
    running, previews = pipe.begin([one]), []
    while running.stepping():
        pipe.step(running)
        previews.append(pipe.preview(running, [0]))
    assert running.steps == [len(previews)] and len(previews) == (STEPS if strength == 1 else STEPS // 2)
    image = pipe.finish(running, [0]).images[0]
    assert all(p.shape == (1, *image.shape) and p.dtype == np.uint8 for p in previews)
    assert np.abs(previews[-1][0].astype(int) - image.astype(int)).max() <= 2


def test_an_edit_batch_never_mixes_with_text_to_image(pipe):
    """Edits of any strength run together (each row has its own); with joining off they batch by strength."""
    t2i, edit = spec(pipe, 1), spec(pipe, 1, strength=1.0, image=photo(pipe))
    assert t2i.join_key() != edit.join_key() and t2i.batch_key() != edit.batch_key()
    assert edit.join_key() == replace(edit, strength=0.5).join_key()
    assert edit.batch_key() != replace(edit, strength=0.5).batch_key()
