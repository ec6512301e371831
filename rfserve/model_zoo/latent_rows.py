"""The end of a batch for the families whose rows hold latents that a VAE decodes (the SD families, Hunyuan-DiT):
finished rows decoded, composited for a masked edit, and rounded to bytes."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer
from rfserve.model_zoo.edits import composite
from rfserve.model_zoo.running import Running, Stepped, in_spec_order
from rfserve.model_zoo.sd_components import to_uint8


class LatentRows(Stepped):
    """For a pipeline with `parts` (`decode`, `synchronize`) and a text cache `text`, whose running rows keep
    their latents as `x` and, for an edit, their `EditLatents` as `edit`."""
    parts: Any
    text: Any

    def shown(self, running: Running, latents: torch.Tensor, rows: list[int]) -> np.ndarray:
        """A preview: clean-latent estimates (n, C, h, w) of `rows`, decoded and composited, as uint8 (n, H, W, 3)."""
        return to_uint8(composite(running.rows.get("edit"), self.parts.decode(latents), rows))[0]

    def decoded(self, running: Running, rows: list[int]) -> torch.Tensor:
        """`rows` decoded to float images (n, 3, H, W) in [0, 1], composited for a masked edit; they leave."""
        images = composite(running.rows.get("edit"), self.parts.decode(running.rows["x"][rows]), rows)
        running.leave(rows)
        return images

    def finish(self, running: Running, rows: list[int]) -> BatchOutput:
        timer = StageTimer(self.parts.synchronize)
        truncated = [running.truncated[i] for i in rows]
        with timer.stage("decode"):
            pixels, on_device = to_uint8(self.decoded(running, rows))
        return BatchOutput(pixels, truncated, timer.timings, on_device)

    def images(self, specs: list[ImageSpec]) -> tuple[torch.Tensor, list[bool]]:
        """Float images (B, 3, H, W) in [0, 1] in spec order, before `run` rounds them to bytes, and per-image
        prompt-truncation flags: for comparisons finer than a byte."""
        truncated = self.text.encode([s.prompt for s in specs])[1]
        parts, _ = self.to_end(specs, self.decoded)
        return in_spec_order(parts, len(specs)), truncated
