"""The next image token of every row: CFG on the generation head's logits, then argmax or a seeded draw.

CFG is `generate()`'s `ClassifierFreeGuidanceLogitsProcessor`, u + (c − u)·w, with each row's own weight, and
only for rows whose weight is above 1 (`generate()` adds the processor only then; the others take their
conditional logits as they are, and have no unconditional row to run). Sampling draws from softmax(logits / T)
by `model_zoo.seeding.draw`, one uniform per row from that row's own CPU generator: a row's draws then depend
on its seed alone, never on the batch. Temperature 0 is greedy.
"""
from __future__ import annotations

import torch

from rfserve.model_zoo.seeding import draw


def guided_scores(logits: torch.Tensor, cond_at: torch.Tensor, uncond_at: torch.Tensor, guided: torch.Tensor,
                  guidance: torch.Tensor) -> torch.Tensor:
    """logits (K, V) of a batch's KV rows → each row's scores (B, V), float32: the logits of its conditional KV
    row `cond_at` (B,), guided by its weight `guidance` (B,) for the rows `guided` (n,), whose unconditional
    KV rows are `uncond_at` (n,). Elementwise per row, so a row's scores are the same in any batch."""
    scores = logits[cond_at].float()
    if len(guided):
        cond, uncond = scores[guided], logits[uncond_at].float()
        scores[guided] = uncond + (cond - uncond) * guidance[guided, None]
    return scores


def next_tokens(scores: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """scores (B, V) → tokens (B,)."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    return draw(torch.softmax(scores / temperature, dim=-1), generators)
