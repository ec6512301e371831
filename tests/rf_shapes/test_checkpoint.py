"""The shipped checkpoints: size and dtype, loading through the serving loader, and adherence."""
import json

import numpy as np
import pytest
from safetensors import safe_open

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.rf_shapes.checker import check
from rfserve.model_zoo.rf_shapes.data import make_batch
from rfserve.model_zoo.rf_shapes.presets import CHECKPOINT_DIR, RF_SHAPES_DEFAULTS
from rfserve.model_zoo.rf_shapes.sampling import generate

MODELS = ("rf-shapes", "rf-shapes-2rf")


@pytest.fixture(scope="module")
def pipes():
    return {name: InstaFlowPipeline.from_pretrained(RF_SHAPES_DEFAULTS[name]["path"]) for name in MODELS}


def _settings(name):
    d = RF_SHAPES_DEFAULTS[name]
    return {"steps": d["steps"], "guidance": d["guidance"]}


def test_shipped_weights_are_small_fp16_safetensors():
    files = [f for f in CHECKPOINT_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20e6
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 3 * len(MODELS) + 1                     # and the 2-RF folder's count guide
    assert (CHECKPOINT_DIR / "rf-shapes-2rf" / "count_guide" / "model.safetensors").is_file()
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    for f in weights:
        with safe_open(f, "pt") as st:
            assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"F16"}, f


@pytest.mark.parametrize("name", MODELS)
def test_layout_matches_instaflow(name):
    folder = RF_SHAPES_DEFAULTS[name]["path"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "RectifiedFlowPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"


def test_loads_through_the_serving_loader_at_64px(pipes):
    for name, pipe in pipes.items():
        assert pipe.default_size == (64, 64), name
        assert pipe.parts.latent_shape(64, 64) == (8, 16, 16)


@pytest.mark.parametrize("name", MODELS)
def test_training_sampler_matches_serving_pipeline(pipes, name):
    """The sampler used to make reflow pairs must have the serving semantics (timesteps, CFG, seeds, the count
    guide)."""
    pipe, kw = pipes[name], _settings(name)
    prompts = ["two green squares on a purple background", "a white triangle on a black background"]
    served = pipe.generate(prompts, [5, 6], **kw)
    parts = pipe.parts
    ours = generate({"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder,
                     "tokenizer": parts.tokenizer}, prompts, [5, 6], count_guide=pipe.count_guide, **kw)
    assert np.abs(served.astype(int) - ours.astype(int)).max() <= 1


# Regression floors, below what the shipped one-step model measured on 384 held-out prompts
# (colour 0.99, background 1.00, count 0.84, shape 0.87; benchmarks/RESULTS.md), with room for 64 prompts'
# sampling noise (these 64 read 0.98, 1.00, 0.80, 0.84). The count floor is above the 0.67 that the one-step model
# before count tuning measured; the shape and count targets (0.90, 0.85) are above what it reaches.
FLOORS = {"colour": 0.9, "background": 0.95, "count": 0.7, "shape": 0.6}


def test_one_step_images_pass_the_checker_on_held_out_prompts(pipes):
    _, scenes, captions = make_batch(2024, 64, held_out=True)
    images = pipes["rf-shapes"].generate(captions, list(range(100, 164)), **_settings("rf-shapes"))
    acc = check(images, scenes)
    assert all(acc[k] >= floor for k, floor in FLOORS.items()), acc

