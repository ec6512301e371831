"""The next image token of every row: CFG on the generation head's logits, then argmax or a seeded draw.

CFG is `generate()`'s `ClassifierFreeGuidanceLogitsProcessor`, u + (c − u)·w, with one weight per row.
Sampling draws from softmax(logits / T) by `model_zoo.seeding.draw`, one uniform per row from that row's
own CPU generator: a row's draws then depend on its seed alone, never on the batch. Temperature 0 is greedy.
"""
from __future__ import annotations

import torch

from rfserve.model_zoo.seeding import draw


def guided_logits(logits: torch.Tensor, guidance: torch.Tensor | float) -> torch.Tensor:
    """logits (2B, V) as [cond B; uncond B] → (B, V); `guidance` a float or (B,) weights."""
    cond, uncond = logits.float().chunk(2)
    w = guidance[:, None] if isinstance(guidance, torch.Tensor) else guidance
    return uncond + (cond - uncond) * w


def next_tokens(scores: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """scores (B, V) → tokens (B,)."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    return draw(torch.softmax(scores / temperature, dim=-1), generators)
