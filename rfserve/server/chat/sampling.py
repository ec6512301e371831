"""Every running sequence's next token in one batched pass: greedy at temperature 0, otherwise temperature and
top-p sampling, each row from its own generator (seeded by the request's `seed`; `model_zoo.seeding.draw`).

One pass and one device sync per decode step, whatever the mix of rows: choosing row by row would cost a
handful of kernel launches and a sync per sequence, which on a GPU at 32 streams is a large share of a step.
"""
from __future__ import annotations

import torch

from rfserve.model_zoo.seeding import draw


# The most likely tokens top-p looks among first: sorting a 100k vocabulary costs about 10 ms a row on a CPU
# core, and the mass a top-p below 1 keeps almost always lies in the head. Where it does not, the whole sorts.
HEAD = 256


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` (n, V), keep the smallest set of most likely tokens whose mass reaches that row's
    `top_p` (n, 1); renormalise. A row with top_p ≥ 1 keeps every token (its rounding never drops the tail)."""
    sorted_p, order = probs.topk(min(HEAD, probs.shape[-1]), dim=-1)                        # (n, k) descending
    mass = sorted_p.cumsum(-1)
    if sorted_p.shape[-1] < probs.shape[-1] and not bool((mass[:, -1:] >= top_p).all()):
        sorted_p, order = probs.sort(dim=-1, descending=True)                               # (n, V)
        mass = sorted_p.cumsum(-1)
    before = mass - sorted_p                           # mass of strictly more likely tokens
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
        probs = torch.softmax(logits[index] / t, dim=-1)                                      # (m, V)
        if any(top_ps[i] < 1.0 for i in rows):             # the sort over the vocabulary only when one cuts
            probs = top_p_filter(probs, torch.tensor([top_ps[i] for i in rows], device=logits.device)[:, None])
        tokens[index] = draw(probs, [generators[i] for i in rows])
    return tokens.tolist()
