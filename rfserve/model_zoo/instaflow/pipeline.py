"""InstaFlow (and rf-shapes): Euler integration of a velocity-predicting SD UNet from
noise (UNet timestep 1000) to data, `x += v/N`. Semantics follow the official
RectifiedFlowPipeline; see the reference notes §1."""
from __future__ import annotations

from pathlib import Path

import torch

from rfserve.model_zoo.base import between_steps
from rfserve.model_zoo.edits import EditLatents, run_steps
from rfserve.model_zoo.samplers import euler_update, keep_rows, straight_ahead
from rfserve.model_zoo.sd_components import SDComponents
from rfserve.model_zoo.sd_pipeline import SDFlowPipeline


class InstaFlowPipeline(SDFlowPipeline):
    family = "instaflow"

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, variant: str | None = None,
                        **decoder) -> "InstaFlowPipeline":
        """`decoder`: `tiny_vae` / `vae_tiling`, as `SDComponents.load` takes them."""
        return cls(SDComponents.load(Path(path), device=device, dtype=dtype, variant=variant, **decoder))

    @torch.inference_mode()
    def sample(self, x: torch.Tensor, emb: torch.Tensor, steps: int, guidance: torch.Tensor | float | None,
               edit: EditLatents | None = None) -> torch.Tensor:
        """x: (B, C, h, w) noise; emb: (B, L, D), or (2B, L, D) negative-first with guidance. Progress s runs
        from 0 (noise) to 1 (data) along x_s = s·data + (1 − s)·noise; an edit starts at s = 1 − strength from
        its input's point on that line and takes its share of the steps, each as long as text-to-image's."""
        start, n, cfg = 0.0, steps, guidance is not None
        if edit is not None:
            start, n = 1.0 - edit.strength, max(1, run_steps(steps, edit.strength))
            x = line_point(edit.data, x, start)
        dt = (1.0 - start) / n
        for i in range(n):
            s = start + i * (1.0 - start) / n
            t = (1.0 - s) * 1000.0                       # 1000 = pure noise
            x_in = x if guidance is None else torch.cat([x, x])
            t_vec = torch.full((x_in.shape[0],), t, device=x.device)   # float32, as the reference
            v = self.parts.denoiser(x_in, t_vec, encoder_hidden_states=emb, return_dict=False)[0]
            x_prev, x = x, euler_update(x, v, dt, guidance)
            if edit is not None:
                x = edit.hold(x, lambda data, noise: line_point(data, noise, s + dt))
            keep = between_steps(lambda rows: self.preview(straight_ahead(x_prev, x, rows, 1.0 - s - dt, dt),
                                                           edit, rows), n)
            if keep is not None:
                x, emb, guidance = keep_rows(keep, x), keep_rows(keep, emb, 1 + cfg), keep_rows(keep, guidance)
                if edit is not None:
                    edit.keep(keep)
        return x


def line_point(data: torch.Tensor, noise: torch.Tensor, s: float) -> torch.Tensor:
    """The point at progress s of the straight path from noise (s = 0) to data (s = 1)."""
    return s * data + (1.0 - s) * noise
