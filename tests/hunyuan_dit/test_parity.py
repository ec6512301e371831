"""Our pipeline against diffusers' HunyuanDiTPipeline on the same folder, seeds and settings,
fp32 on CPU. diffusers gets one CPU generator per image (seed s + i) and
`use_resolution_binning=False`: the tiny checkpoint's sizes are the trained shapes scaled by
1/8, which diffusers' binning (fixed to 1024-px shapes) would otherwise move."""
import pytest
import torch
from diffusers import HunyuanDiTPipeline

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
from rfserve.model_zoo.hunyuan_dit.schedulers import SCHEDULERS

PROMPTS = ["a red circle on a blue square", "一只猫坐在桌子上, photo"]
NEGATIVES = ["", "blurry"]
SEEDS = [11, 12]
ATOL = 1e-3


def reference(root, width, height, steps=3, guidance=5.0, scheduler=None, guidance_rescale=0.0):
    pipe = HunyuanDiTPipeline.from_pretrained(root)
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                negative_prompt=NEGATIVES, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                guidance_rescale=guidance_rescale, output_type="pt", use_resolution_binning=False).images


def ours(root, width, height, steps=3, guidance=5.0, **kwargs):
    pipe = HunyuanPipeline.from_pretrained(root, **kwargs)
    specs = [ImageSpec(p, n, s, width, height, steps, guidance) for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)]
    return pipe.images(specs)[0]


def check(got, want):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= ATOL, err
    assert (got[0] - got[1]).abs().max() > 0.01   # two different images, not a degenerate output


@pytest.mark.parametrize("version", ["v1.2", "v1.1"])
@pytest.mark.parametrize("width,height", [(128, 128), (160, 96)])
@pytest.mark.smoke
def test_matches_diffusers(tiny_hunyuan, tiny_hunyuan_v11, version, width, height):
    root = tiny_hunyuan if version == "v1.2" else tiny_hunyuan_v11
    check(ours(root, width, height), reference(root, width, height))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_scheduler_options_match_diffusers(tiny_hunyuan, scheduler):
    check(ours(tiny_hunyuan, 96, 128, steps=4, scheduler=scheduler),
          reference(tiny_hunyuan, 96, 128, steps=4, scheduler=scheduler))


def test_guidance_rescale_and_no_cfg_match_diffusers(tiny_hunyuan_v11):
    check(ours(tiny_hunyuan_v11, 128, 96, guidance_rescale=0.7),
          reference(tiny_hunyuan_v11, 128, 96, guidance_rescale=0.7))
    check(ours(tiny_hunyuan_v11, 128, 96, guidance=1.0), reference(tiny_hunyuan_v11, 128, 96, guidance=1.0))
