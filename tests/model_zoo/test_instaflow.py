"""InstaFlow pipeline against a reference Euler loop written here over the same
diffusers components, plus the seed contract."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return InstaFlowPipeline.from_pretrained(tiny_sd)


def reference_images(root, prompts, seeds, steps, guidance, negative=""):
    """The official RectifiedFlowPipeline loop, restated: timestep (1 - i/N)·1000,
    x += v/N, CFG v_neg + g(v_text - v_neg) only when g > 1."""
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    with torch.no_grad():
        cond = embed(prompts)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        side = unet.config.sample_size
        latents = torch.cat([torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(s))
                             for s in seeds])
        cfg = guidance > 1.0
        emb = torch.cat([embed([negative] * len(prompts)), cond]) if cfg else cond
        dt = 1.0 / steps
        for i in range(steps):
            t = (1.0 - i / steps) * 1000.0
            x_in = torch.cat([latents] * 2) if cfg else latents
            v = unet(x_in, torch.ones((x_in.shape[0],)) * t, encoder_hidden_states=emb).sample
            if cfg:
                v_neg, v_text = v.chunk(2)
                v = v_neg + guidance * (v_text - v_neg)
            latents = latents + dt * v
        image = vae.decode(latents / vae.config.scaling_factor).sample
        assert image.shape[-1] == side * f
        return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("steps,guidance", [(1, 0.0), (3, 1.5)])
@pytest.mark.smoke
def test_matches_reference_euler_loop(pipe, tiny_sd, steps, guidance):
    prompts, seeds = ["a red circle", "two blue squares on a green background"], [7, 8]
    w, h = pipe.default_size
    specs = [ImageSpec(p, "", s, w, h, steps, guidance) for p, s in zip(prompts, seeds)]
    ours, _ = pipe.images(specs)
    ref = reference_images(tiny_sd, prompts, seeds, steps, guidance)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_guidance_changes_the_image(pipe):
    a = pipe.generate(["a red circle"], [3], steps=2, guidance=0.0)
    b = pipe.generate(["a red circle"], [3], steps=2, guidance=3.0)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_seed_contract_alone_equals_position_5_of_8(pipe):
    w, h = pipe.default_size
    target = ImageSpec("a green triangle", "", 1234, w, h, 2, 1.5)
    alone, _ = pipe.images([target])
    others = [ImageSpec(f"prompt {i}", "blurry", 99 + i, w, h, 2, 2.5) for i in range(7)]
    batch = others[:5] + [target] + others[5:]
    together, _ = pipe.images(batch)
    assert torch.allclose(alone[0], together[5], atol=1e-5)
    assert not torch.allclose(together[4], together[5], atol=1e-3)


def test_over_long_prompt_is_truncated_and_flagged(pipe):
    w, h = pipe.default_size
    long = "red " * 200
    out = pipe.run([ImageSpec(long, "", 1, w, h, 1, 0.0), ImageSpec("red", "", 1, w, h, 1, 0.0)])
    assert out.prompt_truncated == [True, False]
    assert out.images.shape == (2, h, w, 3) and out.images.dtype == np.uint8
    assert set(out.timings) == {"encode", "sample", "decode"}


def test_tiny_vae_and_tiling_options(tiny_sd, tmp_path):
    from diffusers import AutoencoderTiny

    from rfserve.model_zoo.registry import load_model, parse_spec

    AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    spec = parse_spec(f"instaflow-0.9b={tiny_sd}?tiny_vae={tmp_path / 'taesd'}")
    tiny = load_model(spec, torch.device("cpu"), torch.float32)
    assert type(tiny.pipeline.parts.vae).__name__ == "AutoencoderTiny"
    assert tiny.card.sizes[0] == "16x16"
    full = InstaFlowPipeline.from_pretrained(tiny_sd)
    a = tiny.pipeline.generate(["a cat"], [1], steps=1, guidance=0.0)
    b = full.generate(["a cat"], [1], steps=1, guidance=0.0)
    assert a.shape == b.shape == (1, 16, 16, 3) and np.abs(a.astype(int) - b.astype(int)).max() > 0
    tiled = load_model(parse_spec(f"instaflow-0.9b={tiny_sd}?vae_tiling=1"), torch.device("cpu"), torch.float32)
    assert tiled.pipeline.parts.vae.use_tiling
