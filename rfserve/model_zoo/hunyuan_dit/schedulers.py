"""Which diffusers scheduler steps the loop.

The default is the checkpoint's own `scheduler/scheduler_config.json`: DDPM with v-prediction
for every published Hunyuan-DiT (the reference pipeline's sampler). `?scheduler=ddim` and
`?scheduler=dpm` (DPMSolverMultistepScheduler, the fast multistep solver; the official repo's
`dpmms`) are built `from_config` of that same config, so betas, prediction type and timestep
spacing stay the checkpoint's. Each image gets a scheduler of its own (`row_schedule`): they carry step state
(DPM's multistep history, the step index), and each image runs its own number of steps.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from rfserve.model_zoo.edits import run_steps
from rfserve.model_zoo.loading import CheckpointError

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def scheduler_name(config: dict, requested: str | None) -> str:
    """`requested` if given, else the key of the checkpoint's scheduler class."""
    if requested is not None:
        if requested not in SCHEDULERS:
            raise CheckpointError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {requested!r}")
        return requested
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()}
    found = config.get("_class_name")
    if found not in by_class:
        raise CheckpointError(f"scheduler_config.json names {found!r}; pick one of {sorted(SCHEDULERS)} "
                              f"with ?scheduler=")
    return by_class[found]


def make_scheduler(name: str, config: dict):
    return SCHEDULERS[name].from_config(config)


def row_schedule(name: str, config: dict, steps: int, strength: float,
                 device) -> tuple[Any, torch.Tensor, bool]:
    """One image's scheduler, set to its `steps`, the timesteps it runs, and whether that is part of the schedule:
    an edit runs the last `run_steps` of them, the scheduler told where it begins (as diffusers' img2img does);
    at strength 1 all of them, as text-to-image."""
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    begin = len(timesteps) - run_steps(len(timesteps), strength)
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler, timesteps[begin:], begin > 0


def step_kwargs(scheduler, generators: list) -> dict:
    """What HunyuanDiTPipeline.prepare_extra_step_kwargs passes (eta 0; the per-image
    generators, which DDPM draws its variance noise from at every step)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def clean_estimate(scheduler, pred: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """x̂₀ from the guided prediction at `timestep` (`sample` is x_t), in the checkpoint's prediction type:
    for v-prediction √ᾱ·x_t − √(1 − ᾱ)·v, for epsilon (x_t − √(1 − ᾱ)·ε) / √ᾱ. One multiply-add, for previews."""
    a = scheduler.alphas_cumprod[int(timestep)].to(sample)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * pred
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * pred) / a.sqrt()
    return pred
