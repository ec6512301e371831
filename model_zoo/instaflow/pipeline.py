"""InstaFlow (and rf-shapes): Euler integration of a velocity-predicting SD UNet from
noise (UNet timestep 1000) to data, `x += v/N`. Semantics follow the official
RectifiedFlowPipeline; see the reference notes §1."""
from __future__ import annotations

from pathlib import Path

import torch

from model_zoo.base import between_steps
from model_zoo.samplers import euler_update, keep_rows
from model_zoo.sd_components import SDComponents
from model_zoo.sd_pipeline import SDFlowPipeline


class InstaFlowPipeline(SDFlowPipeline):
    family = "instaflow"

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, variant: str | None = None,
                        **decoder) -> "InstaFlowPipeline":
        """`decoder`: `tiny_vae` / `vae_tiling`, as `SDComponents.load` takes them."""
        return cls(SDComponents.load(Path(path), device=device, dtype=dtype, variant=variant, **decoder))

    @torch.inference_mode()
    def sample(self, x: torch.Tensor, emb: torch.Tensor, steps: int,
               guidance: torch.Tensor | float | None) -> torch.Tensor:
        """x: (B, C, h, w) noise; emb: (B, L, D), or (2B, L, D) negative-first with guidance."""
        dt, cfg = 1.0 / steps, guidance is not None
        for i in range(steps):
            t = (1.0 - i / steps) * 1000.0               # 1000 = pure noise
            x_in = x if guidance is None else torch.cat([x, x])
            t_vec = torch.full((x_in.shape[0],), t, device=x.device)   # float32, as the reference
            v = self.parts.denoiser(x_in, t_vec, encoder_hidden_states=emb, return_dict=False)[0]
            x = euler_update(x, v, dt, guidance)
            keep = between_steps()
            if keep is not None:
                x, emb, guidance = keep_rows(keep, x), keep_rows(keep, emb, 1 + cfg), keep_rows(keep, guidance)
        return x
