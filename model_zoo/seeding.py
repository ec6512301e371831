"""Per-image noise, so an image never depends on the batch it ran in.

Image i of a request with seed s draws from `torch.Generator("cpu").manual_seed(s + i)`,
exactly as diffusers' `randn_tensor` does when handed a list of CPU generators:
one (1, C, h, w) draw per image in the pipeline dtype, then a move to the device.
"""
import secrets

import torch

# The largest integer a JSON number carries exactly to every client: JavaScript, and any schema validator
# that parses numbers as doubles, would round a larger seed. Image i's seed + i may pass it; torch's
# generators take any integer below 2**64.
MAX_SEED = 2**53 - 1


def random_seed() -> int:
    return secrets.randbelow(2**32)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """Image i's own CPU generator: every random draw for that image comes from it, never from the batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def seeded_noise(seeds: list[int], shape: tuple[int, ...], *, dtype: torch.dtype,
                 device: torch.device | str) -> tuple[torch.Tensor, list[torch.Generator]]:
    """`shape` is one image's latent shape (C, h, w); returns ((B, C, h, w) noise, the B generators).

    Samplers that keep drawing after the initial noise (DDPM's per-step variance noise) continue from
    each image's own generator, as diffusers does with a list of them."""
    gens = generators(seeds)
    draws = [torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens]
    return torch.cat(draws, dim=0).to(device), gens


def initial_noise(seeds: list[int], shape: tuple[int, ...], *, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """The initial noise alone, for samplers that draw nothing more."""
    return seeded_noise(seeds, shape, dtype=dtype, device=device)[0]
