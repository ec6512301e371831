"""The next image token of every row: CFG on the generation head's logits, then argmax or a seeded draw.

CFG is `generate()`'s `ClassifierFreeGuidanceLogitsProcessor`, u + (c − u)·w, with one weight per row.
Sampling draws from softmax(logits / T) as `torch.multinomial` does, but by the inverse CDF of one
uniform per row from that row's own CPU generator (`torch.Generator("cpu").manual_seed(s + i)`, the seed
contract of `model_zoo.seeding`): a row's draws then depend on its seed alone, never on the batch, and the
device receives B floats per step instead of a generator it cannot use. Temperature 0 is greedy.
"""
from __future__ import annotations

import torch


def guided_logits(logits: torch.Tensor, guidance: torch.Tensor | float) -> torch.Tensor:
    """logits (2B, V) as [cond B; uncond B] → (B, V); `guidance` a float or (B,) weights."""
    cond, uncond = logits.float().chunk(2)
    w = guidance[:, None] if isinstance(guidance, torch.Tensor) else guidance
    return uncond + (cond - uncond) * w


def next_tokens(scores: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """scores (B, V) → tokens (B,)."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])     # (B,)
    cdf = probs.double().cumsum(dim=-1)                                                       # (B, V)
    u = u.to(cdf.device)[:, None] * cdf[:, -1:]             # × the total: u < cdf[-1], never past it
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=scores.shape[-1] - 1)
