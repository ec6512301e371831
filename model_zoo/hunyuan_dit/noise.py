"""Per-image noise together with the generators it came from.

The initial draw is `model_zoo.seeding`'s contract (image i of seed s: a CPU generator seeded
s + i, one (1, C, h, w) draw). DDPM keeps drawing variance noise at every step; diffusers does
that from the same list of generators, so they are kept, and each image's noise stays its own
whatever batch it runs in.
"""
from __future__ import annotations

import torch


def seeded_noise(seeds: list[int], shape: tuple[int, ...], *, dtype: torch.dtype,
                 device: torch.device | str) -> tuple[torch.Tensor, list[torch.Generator]]:
    """`shape` is one image's latent shape (C, h, w); returns ((B, C, h, w) noise, B generators)."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    draws = [torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(draws, dim=0).to(device), generators
