"""Every running sequence's next token in one batched pass: greedy at temperature 0, otherwise temperature and
top-p sampling, each row from its own generator (seeded by the request's `seed`; `model_zoo.seeding.draw`).

One pass and one device sync per decode step, whatever the mix of rows: choosing row by row would cost a
handful of kernel launches and a sync per sequence, which on a GPU at 32 streams is a large share of a step.
"""
from __future__ import annotations

import torch

from model_zoo.seeding import draw


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` (n, V), keep the smallest set of most likely tokens whose mass reaches that row's
    `top_p` (n, 1); renormalise. A row with top_p ≥ 1 keeps every token (its rounding never drops the tail)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p            # mass of strictly more likely tokens
    sorted_p = torch.where((before < top_p) | (top_p >= 1.0), sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                generators: list[torch.Generator | None]) -> list[int]:
    """logits (n, V) fp32, one row per sequence, with that sequence's temperature, top_p and generator → n ids."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperatures) if t > 0.0]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        t = torch.tensor([temperatures[i] for i in rows], device=logits.device)[:, None]        # (m, 1)
        top_p = torch.tensor([top_ps[i] for i in rows], device=logits.device)[:, None]
        probs = top_p_filter(torch.softmax(logits[index] / t, dim=-1), top_p)                # (m, V)
        tokens[index] = draw(probs, [generators[i] for i in rows])
    return tokens.tolist()
