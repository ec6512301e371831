"""PeRFlow on an SD1.5 UNet: the standard SD text-to-image loop (CFG on eps, uncond
first) driven by the piecewise scheduler, with CFG and the window step fused."""
from __future__ import annotations

from pathlib import Path

import torch

from rfserve.model_zoo.base import between_steps
from rfserve.model_zoo.edits import EditLatents, run_steps
from rfserve.model_zoo.loading import CheckpointError, resolve_source
from rfserve.model_zoo.perflow.delta import is_delta_folder, merge_delta
from rfserve.model_zoo.perflow.scheduler import PeRFlowScheduler
from rfserve.model_zoo.samplers import keep_rows, straight_ahead
from rfserve.model_zoo.sd_components import SDComponents, load_unet
from rfserve.model_zoo.sd_pipeline import SDFlowPipeline

BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


class PeRFlowPipeline(SDFlowPipeline):
    family = "perflow"

    def __init__(self, parts: SDComponents, prediction_type: str = "diff_eps"):
        super().__init__(parts)
        betas = {k: parts.scheduler_config[k] for k in BETA_KEYS if k in parts.scheduler_config}
        self.scheduler = PeRFlowScheduler(**betas, prediction_type=prediction_type, num_time_windows=4)
        self.init_noise_sigma = self.scheduler.init_noise_sigma

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32,
                        variant: str | None = None, base: str | None = None,
                        prediction_type: str = "diff_eps", **decoder) -> "PeRFlowPipeline":
        """A full pipeline folder, or a ΔW folder merged onto `base` (an SD1.5 pipeline).
        `decoder`: `tiny_vae` / `vae_tiling`, as `SDComponents.load` takes them."""
        root = Path(path)
        if not is_delta_folder(root):
            parts = SDComponents.load(root, device=device, dtype=dtype, variant=variant, **decoder)
            return cls(parts, prediction_type)
        if base is None:
            raise CheckpointError(f"{root} holds ΔW weights: give the SD1.5 base with ?base=PATH_OR_HUB_ID")
        base_root = resolve_source(base)
        unet = merge_delta(load_unet(base_root, "unet", dtype=torch.float32), root, variant).to(dtype)
        parts = SDComponents.load(base_root, device=device, dtype=dtype, unet=unet, **decoder)
        return cls(parts, prediction_type)

    @torch.inference_mode()
    def sample(self, x: torch.Tensor, emb: torch.Tensor, steps: int, guidance: torch.Tensor | float | None,
               edit: EditLatents | None = None) -> torch.Tensor:
        """x: (B, C, h, w) noise; emb: (B, L, D), or (2B, L, D) negative-first with guidance. An edit runs the
        last `run_steps` timesteps of the schedule (none: the input itself), from its input's point on the
        windows' path."""
        sched, cfg = self.scheduler, guidance is not None
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.tolist()                # ints 1000, 750, ... kept on the host
        if edit is not None:
            timesteps = timesteps[len(timesteps) - run_steps(len(timesteps), edit.strength):]
            x = sched.noised(edit.data, x, timesteps[0] if timesteps else 0)
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            x_in = x if guidance is None else torch.cat([x, x])
            eps = self.parts.denoiser(x_in, t, encoder_hidden_states=emb, return_dict=False)[0]
            x_prev, x = x, sched.fused_step(eps, t, x, guidance)
            if edit is not None:
                x = edit.hold(x, lambda data, noise: sched.noised(data, noise, t_next))
            # Inside a window the path is straight: its line, continued to t = 0, is the preview.
            keep = between_steps(lambda rows: self.preview(straight_ahead(x_prev, x, rows, t_next, t - t_next),
                                                           edit, rows), len(timesteps))
            if keep is not None:
                x, emb, guidance = keep_rows(keep, x), keep_rows(keep, emb, 1 + cfg), keep_rows(keep, guidance)
                if edit is not None:
                    edit.keep(keep)
        return x
