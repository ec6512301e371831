"""Per-image noise, so an image never depends on the batch it ran in.

Image i of a request with seed s draws from `torch.Generator("cpu").manual_seed(s + i)`,
exactly as diffusers' `randn_tensor` does when handed a list of CPU generators:
one (1, C, h, w) draw per image in the pipeline dtype, then a move to the device.
Token sampling (`draw`) keeps the same contract: one uniform per row from the row's own generator.
"""
import secrets
from collections.abc import Sequence

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


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` (B, V), each with its probability, as `torch.multinomial` draws; returns (B,).

    By the inverse CDF of one uniform per row from that row's own CPU generator (the global CPU generator for a
    row given None): a row's draws depend on its seed alone, never on the batch or the device, and the device
    receives B floats instead of a generator per row, so one pass and one sync serve the whole batch."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])      # (B,)
    cdf = probs.double().cumsum(dim=-1)                                                        # (B, V)
    u = u.to(cdf.device)[:, None] * cdf[:, -1:]              # × the total: u < cdf[-1], never past it
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
