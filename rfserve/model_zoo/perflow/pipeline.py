"""PeRFlow on an SD1.5 UNet: the standard SD text-to-image loop (CFG on eps, uncond
first) driven by the piecewise scheduler, with CFG and the window step fused."""
from __future__ import annotations

from pathlib import Path

import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.edits import EditLatents, run_steps
from rfserve.model_zoo.loading import CheckpointError, resolve_source
from rfserve.model_zoo.perflow.delta import is_delta_folder, merge_delta
from rfserve.model_zoo.perflow.scheduler import PeRFlowScheduler
from rfserve.model_zoo.running import Running
from rfserve.model_zoo.samplers import grouped_update, guided_rows, with_uncond
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

    def start(self, specs: list[ImageSpec], noise: torch.Tensor, edit: EditLatents | None
              ) -> tuple[torch.Tensor, list[int], dict]:
        """Each row's own schedule (host ints 1000, 750, ...); an edit runs its last `run_steps` timesteps (none:
        the input itself), from its input's point on the windows' path."""
        schedules = [self.scheduler.schedule(s.steps) for s in specs]
        if edit is None:
            return noise, [len(ts) for ts in schedules], {"timesteps": schedules}
        schedules = [ts[len(ts) - run_steps(len(ts), s.strength):] for ts, s in zip(schedules, specs)]
        x = self.noised(edit.data, noise, [ts[0] if ts else 0 for ts in schedules])
        return x, [len(ts) for ts in schedules], {"timesteps": schedules}

    @torch.inference_mode()
    def step(self, running: Running) -> None:
        """The standard SD step: eps for x (B, C, h, w) at each row's own timestep, CFG on eps for the rows that
        use it (their unconditional copies first), then the window step fused with guidance, per group of rows at
        the same (t, t_next)."""
        r, specs = running.rows, running.specs
        x, cfg = r["x"], guided_rows(specs)
        here = [_at(ts, i) for ts, i in zip(r["timesteps"], running.done)]          # (t, t_next) per row
        t = torch.tensor([t for t, _ in here], dtype=torch.int64, device=x.device)
        self.bind_lora(running, cfg)
        eps = self.parts.denoiser(with_uncond(x, cfg), with_uncond(t, cfg),
                                  encoder_hidden_states=with_uncond(r["emb"], cfg, r["neg"]), return_dict=False)[0]
        x_next = grouped_update(x, eps, cfg, here, [spec.guidance for spec in specs],
                                lambda xg, eg, key, g: self.scheduler.fused_step(eg, key[0], key[1], xg, g))
        if "edit" in r:
            x_next = r["edit"].hold(x_next, lambda data, noise: self.noised(data, noise, [n for _, n in here]))
        r["prev"], r["x"] = x, x_next
        running.advance()

    def ahead(self, running: Running) -> list[float]:
        """Inside a window the path is straight: the last step from t to t_next, continued to t = 0."""
        out = []
        for ts, i in zip(running.rows["timesteps"], running.done):
            t, t_next = _at(ts, i - 1)
            out.append(t_next / (t - t_next))
        return out

    def noised(self, data: torch.Tensor, noise: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Each row's input at its own timestep of the windows' path."""
        return torch.cat([self.scheduler.noised(data[i:i + 1], noise[i:i + 1], t) for i, t in enumerate(timesteps)])


def _at(timesteps: list[int], i: int) -> tuple[int, int]:
    """Step i of a schedule: from its timestep to the next (0 after the last)."""
    return timesteps[i], timesteps[i + 1] if i + 1 < len(timesteps) else 0
