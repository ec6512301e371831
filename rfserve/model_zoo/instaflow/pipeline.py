"""InstaFlow (and rf-shapes): Euler integration of a velocity-predicting SD UNet from
noise (UNet timestep 1000) to data, `x += v/N`. Semantics follow the official
RectifiedFlowPipeline; see the reference notes §1. A checkpoint that ships a count guide (rf-shapes-2rf,
`rf_shapes.guide`) adds its velocity to each step's."""
from __future__ import annotations

from pathlib import Path

import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.edits import EditLatents, run_steps
from rfserve.model_zoo.rf_shapes.counter import CountGuide
from rfserve.model_zoo.rf_shapes.data import asked_count
from rfserve.model_zoo.rf_shapes.guide import load_count_guide
from rfserve.model_zoo.running import Running
from rfserve.model_zoo.samplers import euler_update, grouped_update, guided_rows, per_row, with_uncond
from rfserve.model_zoo.sd_components import SDComponents
from rfserve.model_zoo.sd_pipeline import SDFlowPipeline


class InstaFlowPipeline(SDFlowPipeline):
    family = "instaflow"

    def __init__(self, parts: SDComponents, count_guide: CountGuide | None = None):
        super().__init__(parts)
        self.count_guide = count_guide

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, variant: str | None = None,
                        count_guidance: float | None = None, **decoder) -> "InstaFlowPipeline":
        """`decoder`: `tiny_vae` / `vae_tiling`, as `SDComponents.load` takes them. `count_guidance`: the scale of
        the folder's count guide, if it ships one (default: its own; 0: none)."""
        parts = SDComponents.load(Path(path), device=device, dtype=dtype, variant=variant, **decoder)
        return cls(parts, load_count_guide(Path(path), count_guidance, device))

    def start(self, specs: list[ImageSpec], noise: torch.Tensor, edit: EditLatents | None
              ) -> tuple[torch.Tensor, list[int], dict]:
        """Progress s runs from 0 (noise) to 1 (data) along x_s = s·data + (1 − s)·noise. A row starts at s₀ = 0,
        or an edit at 1 − strength from its input's point on that line, and takes its share of the steps, each
        as long as text-to-image's. With a count guide, each row also keeps the count its prompt asks for."""
        rows: dict = {} if self.count_guide is None else {"count": [asked_count(s.prompt) for s in specs]}
        if edit is None:
            return noise, [s.steps for s in specs], {**rows, "start": [0.0] * len(specs)}
        starts = [1.0 - s.strength for s in specs]
        x = line_point(edit.data, noise, per_row(starts, noise))
        return x, [max(1, run_steps(s.steps, s.strength)) for s in specs], {**rows, "start": starts}

    @torch.inference_mode()
    def step(self, running: Running) -> None:
        """x (B, C, h, w); each row at its own progress s = s₀ + i·(1 − s₀)/n, its UNet timestep (1 − s)·1000
        (1000 = pure noise), its own dt and guidance. Rows with guidance run an unconditional copy first; a count
        guide adds dt times its velocity at the row's progress."""
        r, specs = running.rows, running.specs
        x, starts, steps = r["x"], r["start"], running.steps
        s = [s0 + i * (1.0 - s0) / n for s0, i, n in zip(starts, running.done, steps)]
        dt = [(1.0 - s0) / n for s0, n in zip(starts, steps)]
        cfg = guided_rows(specs)
        t = torch.tensor([(1.0 - si) * 1000.0 for si in s], device=x.device)      # float32, as the reference
        self.bind_lora(running, cfg)
        v = self.parts.denoiser(with_uncond(x, cfg), with_uncond(t, cfg),
                                encoder_hidden_states=with_uncond(r["emb"], cfg, r["neg"]), return_dict=False)[0]
        x_next = grouped_update(x, v, cfg, dt, [spec.guidance for spec in specs], euler_update)
        if self.count_guide is not None:
            x_next = x_next + per_row(dt, x) * self.count_guide.rows_velocity(x, s, r["count"])
        if "edit" in r:
            reached = per_row([si + h for si, h in zip(s, dt)], x)
            x_next = r["edit"].hold(x_next, lambda data, noise: line_point(data, noise, reached))
        r["prev"], r["x"] = x, x_next
        running.advance()

    def ahead(self, running: Running) -> list[float]:
        """(1 − s − dt)/dt after a step from s: for InstaFlow x̂₁ = x + (1 − s − dt)·v."""
        out = []
        for s0, i, n in zip(running.rows["start"], running.done, running.steps):
            dt = (1.0 - s0) / n
            out.append((1.0 - (s0 + (i - 1) * (1.0 - s0) / n) - dt) / dt)
        return out


def line_point(data: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The point at progress s (per row, (B, 1, 1, 1)) of the straight path from noise (s = 0) to data (s = 1)."""
    return s * data + (1.0 - s) * noise
