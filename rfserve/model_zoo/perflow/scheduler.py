"""PeRFlow's piecewise scheduler: K equal time windows; inside each, the eps prediction
is mapped to the window's end point and integrated with Euler.

Written from the facts in the reference notes (§2): int64-truncated timesteps, the
boundary rule of `get_window`, the ᾱ indices, and the three prediction types. A diffusers
`SchedulerMixin`, so it also drops into an unmodified StableDiffusionPipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from rfserve import kernels
from rfserve.model_zoo.presets import PREDICTION_TYPES
from rfserve.model_zoo.samplers import euler_update



@dataclass(frozen=True)
class WindowStep:
    """Host-side scalars of one step: x_next = x + dt·((λ·x + η·ε) − x)·inv_span."""
    lam: float
    eta: float
    inv_span: float
    dt: float


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 set_alpha_to_one: bool = False, prediction_type: str = "ddim_eps",
                 t_noise: float = 1.0, t_clean: float = 0.0, num_time_windows: int = 4):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                   dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.init_noise_sigma = 1.0
        span = (t_noise - t_clean) / num_time_windows
        self.window_starts = [t_noise - k * span for k in range(num_time_windows)]
        self.window_ends = [t_noise - (k + 1) * span for k in range(num_time_windows)]
        self.timesteps = torch.tensor([], dtype=torch.int64)
        self.num_inference_steps = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """K windows; the first N mod K get one extra step; ×1000 truncated to int64."""
        timesteps = self.schedule(num_inference_steps)
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device or "cpu")

    def window(self, t: float) -> tuple[float, float]:
        """A point on a boundary belongs to the window that starts there."""
        precision = 1.0 / self.config.num_train_timesteps
        for start, end in zip(self.window_starts, self.window_ends):
            if t - 0.1 * precision > end:
                return start, end
        return self.window_starts[-1], self.window_ends[-1]

    def schedule(self, num_inference_steps: int) -> list[int]:
        """The timesteps of an N-step run, on the host, without touching this scheduler's own state (`set_timesteps`
        for diffusers' loops): the serving pipeline keeps one schedule per row."""
        k = self.config.num_time_windows
        n = max(num_inference_steps, k)
        base, extra = divmod(n, k)
        points = [np.linspace(s, e, num=base + (1 if i < extra else 0), endpoint=False)
                  for i, (s, e) in enumerate(zip(self.window_starts, self.window_ends))]
        return (np.concatenate(points) * self.config.num_train_timesteps).astype(np.int64).tolist()

    def window_step(self, timestep: int, t_next: int) -> WindowStep:
        """The step from `timestep` to `t_next` (0: the end)."""
        n_train = self.config.num_train_timesteps
        t_c = timestep / n_train
        t_s, t_e = self.window(t_c)
        dt = (t_next - timestep) / n_train
        inv_span = 1.0 / (t_e - t_c)
        kind = self.config.prediction_type
        if kind == "velocity":
            return WindowStep(lam=1.0, eta=0.0, inv_span=inv_span, dt=dt)
        a_s = float(self.alphas_cumprod[int(t_s * n_train) - 1])
        a_e = float(self.alphas_cumprod[max(int(t_e * n_train) - 1, 0)])
        if kind == "ddim_eps":
            lam_s = math.sqrt(a_e / a_s)
            eta_s = math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
        else:  # diff_eps
            gamma = math.sqrt(a_s / a_e)
            lam_s, eta_s = 1.0 / gamma, -math.sqrt(1 - gamma**2) / gamma
        denom = lam_s * (t_c - t_s) + (t_e - t_c)
        return WindowStep(lam=lam_s * (t_e - t_s) / denom, eta=eta_s * (t_e - t_c) / denom,
                          inv_span=inv_span, dt=dt)

    def noised(self, data: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """Where the path from `noise` to `data` is at `timestep` (0 = data). Windows are straight between their
        end points: with a velocity model those lie on the line from noise to data, otherwise on the SD
        marginal √ᾱ·data + √(1 − ᾱ)·noise, at the ᾱ indices `window_step` uses. The path starts at pure
        noise, as text-to-image does, so an edit of strength 1 is text-to-image."""
        t_c = timestep / self.config.num_train_timesteps
        if t_c <= self.config.t_clean:
            return data
        if t_c >= self.config.t_noise:
            return noise
        t_s, t_e = self.window(t_c)
        if self.config.prediction_type == "velocity":
            return t_c * noise + (1 - t_c) * data
        n_train = self.config.num_train_timesteps
        a_s = float(self.alphas_cumprod[int(t_s * n_train) - 1])
        a_e = float(self.alphas_cumprod[max(int(t_e * n_train) - 1, 0)])
        at_start = noise if t_s >= self.config.t_noise else math.sqrt(a_s) * data + math.sqrt(1 - a_s) * noise
        at_end = math.sqrt(a_e) * data + math.sqrt(1 - a_e) * noise
        return ((t_c - t_e) * at_start + (t_s - t_c) * at_end) / (t_s - t_e)

    def fused_step(self, model_output: torch.Tensor, timestep: int, t_next: int, sample: torch.Tensor,
                   guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """CFG (when `model_output` is the (2B, ...) uncond-first output) and the window step from `timestep` to
        `t_next` in one kernel pass."""
        c = self.window_step(int(timestep), int(t_next))
        if self.config.prediction_type == "velocity":
            return euler_update(sample, model_output, c.dt, guidance)
        return kernels.perflow_step(sample, model_output, lam=c.lam, eta=c.eta,
                                    inv_span=c.inv_span, dt=c.dt, guidance=guidance)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True, **_):
        ts = self.timesteps.tolist()
        nxt = ts.index(int(timestep)) + 1
        prev = self.fused_step(model_output, int(timestep), ts[nxt] if nxt < len(ts) else 0, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return self.config.num_train_timesteps
