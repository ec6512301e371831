"""PeRFlow: the scheduler against the documented timesteps and step formula, the
pipeline against diffusers' own StableDiffusionPipeline, and ΔW merging."""
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.perflow.pipeline import PeRFlowPipeline
from rfserve.model_zoo.perflow.scheduler import PeRFlowScheduler

TABLE = {  # reference notes §2, computed from the official code
    4: [1000, 750, 500, 250],
    5: [1000, 875, 750, 500, 250],
    6: [1000, 875, 750, 625, 500, 250],
    8: [1000, 875, 750, 625, 500, 375, 250, 125],
    10: [1000, 916, 833, 750, 666, 583, 500, 375, 250, 125],
}


@pytest.mark.parametrize("n", sorted(TABLE))
def test_timesteps_match_table(n):
    s = PeRFlowScheduler()
    s.set_timesteps(n)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == TABLE[n]


def test_fewer_steps_than_windows_is_raised_to_four():
    s = PeRFlowScheduler()
    s.set_timesteps(2)
    assert s.timesteps.tolist() == TABLE[4]


def test_boundary_point_belongs_to_the_next_window():
    s = PeRFlowScheduler()
    assert s.window(0.75) == (0.75, 0.5)
    assert s.window(0.76) == (1.0, 0.75)
    assert s.window(0.125) == (0.25, 0.0)


def documented_step(sched, eps, t, x, kind):
    """The step as written in the notes, computed independently of our scheduler."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1 - betas, 0)
    t_c = t / 1000
    ends = [0.75, 0.5, 0.25, 0.0]
    idx = next(i for i, e in enumerate(ends) if t_c - 0.1 / 1000 > e)
    t_s, t_e = 1.0 - 0.25 * idx, ends[idx]
    a_s, a_e = float(ac[int(t_s * 1000) - 1]), float(ac[max(int(t_e * 1000) - 1, 0)])
    if kind == "ddim_eps":
        lam_s = math.sqrt(a_e / a_s)
        eta_s = math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
    else:
        g = math.sqrt(a_s / a_e)
        lam_s, eta_s = 1 / g, -math.sqrt(1 - g * g) / g
    d = lam_s * (t_c - t_s) + (t_e - t_c)
    lam_t, eta_t = lam_s * (t_e - t_s) / d, eta_s * (t_e - t_c) / d
    x_end = lam_t * x.double() + eta_t * eps.double()
    v = (x_end - x.double()) / (t_e - t_c)
    ts = sched.timesteps.tolist()
    nxt = ts[ts.index(t) + 1] if ts.index(t) + 1 < len(ts) else 0
    return (x.double() + (nxt - t) / 1000 * v).float()


@pytest.mark.parametrize("kind", ["diff_eps", "ddim_eps"])
@pytest.mark.parametrize("n", [4, 6, 10])
def test_step_equals_documented_formula(kind, n):
    s = PeRFlowScheduler(prediction_type=kind)
    s.set_timesteps(n)
    for t in s.timesteps.tolist():
        x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        ours = s.step(eps, t, x).prev_sample
        ref = documented_step(s, eps, t, x, kind)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (t, (ours - ref).abs().max())


def test_one_step_per_window_lands_on_the_window_end():
    s = PeRFlowScheduler(prediction_type="ddim_eps")
    s.set_timesteps(4)
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    c = s.window_step(1000, 750)
    assert torch.allclose(s.step(eps, 1000, x).prev_sample, c.lam * x + c.eta * eps, atol=1e-6)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowScheduler(prediction_type="epsilon")


@pytest.mark.parametrize("steps,guidance", [(4, 4.5), (6, 1.0)])
@pytest.mark.smoke
def test_pipeline_matches_diffusers_sd_pipeline(tiny_sd, steps, guidance):
    ours = PeRFlowPipeline.from_pretrained(tiny_sd, prediction_type="diff_eps")
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = PeRFlowScheduler.from_config(ref.scheduler.config, prediction_type="diff_eps")
    ref.set_progress_bar_config(disable=True)
    prompts, seeds = ["a cat", "two dogs"], [11, 12]
    w, h = ours.default_size
    specs = [ImageSpec(p, "blurry", s, w, h, steps, guidance) for p, s in zip(prompts, seeds)]
    mine, _ = ours.images(specs)
    theirs = ref(prompts, negative_prompt=["blurry"] * 2, num_inference_steps=steps, guidance_scale=guidance,
                 height=h, width=w, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()


def test_delta_weights_merge_onto_base(tiny_sd, tmp_path):
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    delta = UNet2DConditionModel.from_config(base.config)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(0, 0.01)
    delta.save_pretrained(tmp_path / "delta", variant="v0-1")
    pipe = PeRFlowPipeline.from_pretrained(tmp_path / "delta", base=str(tiny_sd))
    merged = pipe.parts.unet.state_dict()
    for name, w in base.state_dict().items():
        assert torch.allclose(merged[name], w + delta.state_dict()[name], atol=1e-6), name
    with pytest.raises(CheckpointError, match="base"):
        PeRFlowPipeline.from_pretrained(tmp_path / "delta")
