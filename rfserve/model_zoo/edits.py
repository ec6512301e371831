"""Image-to-image for the flow families: where an edit starts, and how a mask keeps the input.

A flow carries noise to data along a path whose every point is a known mix of the two, so an edit starts
part-way along it, from the input's latent mixed with the seed's noise, and integrates to the end.
`strength` is the share of the path left to run. Each family names the point of its path in its own terms
(`noised`): InstaFlow's straight line, PeRFlow's windows, a diffusers scheduler's `add_noise`.

With a mask, after every step the kept area is put back to where the input itself would be at that point
of the path, so the changed area is generated in context. The decoded picture is then composited, and the
kept area returns as the input's own pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rfserve.model_zoo.base import ImageSpec


def run_steps(steps: int, strength: float) -> int:
    """How many of an N-step schedule an edit runs: its share of the path. None near strength 0, where the
    edit returns the input through the VAE. InstaFlow's continuous time takes at least one step, from wherever
    its edit starts, so a one-step model still edits."""
    return min(steps, round(steps * strength))


@torch.inference_mode()
def edit_latents(specs: list[ImageSpec], vae, noise: torch.Tensor) -> "EditLatents | None":
    """The batch's edit inputs, encoded by `vae`; None for text-to-image."""
    if specs[0].image is None:
        return None
    return EditLatents.build(specs, vae, noise)


def vae_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] → latents scaled as the sampler works on them: the posterior's mean
    (deterministic, so an edit depends only on its seed), or a tiny VAE's latents where one replaces the VAE."""
    out = vae.encode((images * 2 - 1).to(vae.dtype))
    latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
    return latents * vae.config.scaling_factor


@dataclass
class EditLatents:
    """An edit batch's inputs, one row per running row: the input pixels and their latents, the seed's noise, and
    the mask at both sizes (1 where the picture may change; None while no row is masked). Each row's strength is
    its spec's. A `RowState` of `model_zoo.running.Running`: rows leave (`take`) and join (`join`) with the batch."""
    image: torch.Tensor                 # (B, 3, H, W) in [0, 1]
    data: torch.Tensor                  # (B, C, h, w)
    noise: torch.Tensor                 # (B, C, h, w)
    pixel_mask: torch.Tensor | None     # (B, 1, H, W)
    mask: torch.Tensor | None           # (B, 1, h, w)

    @classmethod
    def build(cls, specs: list[ImageSpec], vae, noise: torch.Tensor) -> "EditLatents":
        """At the latent's size a latent counts as changing where any of its pixels may change, so no pixel
        that should change is pinned to the input."""
        stacked = torch.from_numpy(np.stack([s.image for s in specs]))                    # (B, H, W, 3) uint8
        image = (stacked.permute(0, 3, 1, 2).to(noise.device, torch.float32) / 255).to(noise.dtype)
        # In the noise's layout: a VAE may return channels-last latents, and a mix would pass that layout to
        # the denoiser, whose kernels then round differently from text-to-image's.
        data = vae_latents(vae, image).to(noise.dtype).contiguous()
        pixel_mask = mask = None
        if any(s.mask is not None for s in specs):
            masks = [np.ones((s.height, s.width), np.float32) if s.mask is None else s.mask for s in specs]
            pixel_mask = torch.from_numpy(np.stack(masks))[:, None].to(noise.device, noise.dtype)  # (B, 1, H, W)
            mask = F.adaptive_max_pool2d(pixel_mask.float(), data.shape[-2:]).to(noise.dtype)    # (B, 1, h, w)
        return cls(image, data, noise, pixel_mask, mask)

    def take(self, rows: list[int]) -> "EditLatents":
        """Only `rows` go on."""
        pick = (lambda t: None if t is None else t[rows])
        return EditLatents(self.image[rows], self.data[rows], self.noise[rows], pick(self.pixel_mask), pick(self.mask))

    def join(self, other: "EditLatents") -> "EditLatents":
        """`other`'s rows after these. Where only one side is masked, the other's rows get an all-ones mask, which
        changes nothing: 1·x + 0·input is x, exactly."""
        def cat(a: torch.Tensor | None, b: torch.Tensor | None, like_a: torch.Tensor, like_b: torch.Tensor):
            if a is None and b is None:
                return None
            return torch.cat([torch.ones_like(like_a[:, :1]) if a is None else a,
                              torch.ones_like(like_b[:, :1]) if b is None else b])
        return EditLatents(torch.cat([self.image, other.image]), torch.cat([self.data, other.data]),
                           torch.cat([self.noise, other.noise]),
                           cat(self.pixel_mask, other.pixel_mask, self.image, other.image),
                           cat(self.mask, other.mask, self.data, other.data))

    def hold(self, x: torch.Tensor, noised: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`x` with the kept area put back to `noised(data, noise)`, the input at the point each row of x has
        reached."""
        if self.mask is None:
            return x
        return self.mask * x + (1 - self.mask) * noised(self.data, self.noise)


def composite(edit: EditLatents | None, images: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1] of `rows` (all rows when None), the kept area of a masked edit
    the input's own pixels."""
    if edit is None or edit.pixel_mask is None:
        return images
    mask, image = edit.pixel_mask, edit.image
    if rows is not None:
        mask, image = mask[rows], image[rows]
    return mask * images.to(mask.dtype) + (1 - mask) * image
