"""Verified pairs: a teacher's ODE pairs, kept only where the checker reads the endpoint as its caption asks.

Why: reflow and distillation copy their teacher's pairs, mistakes included. The 1-RF teacher draws the wrong
count for about one caption in three (four circles for "three", two that merge into one blob for "two"), so a
student trained on every pair learns to miscount as often, and the one-step model inherited exactly that. Keeping
only the pairs whose picture is right is rejection sampling against a verifier (as in RAFT's reward-ranked
fine-tuning): each student then learns a flow whose endpoints are the right pictures, and its own pairs, checked
again, feed the next stage.

The verifier is the shape checker, which reads colour, kind, count and background from the pixels exactly as the
renderer defines them. The captions come from the training split only, so no held-out combination is drawn,
checked or learnt here; the adherence figures stay held-out.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .checker import read
from .data import Scene, sample_scene
from .sampling import decode
from .stages import make_pairs

ATTRIBUTES = ("colour", "shape", "count", "background")


def accepted(images: np.ndarray, scenes: list[Scene], attributes: tuple[str, ...]) -> np.ndarray:
    """(B,) bool: the checker reads each uint8 image (B, H, W, 3) right on every one of `attributes`."""
    return np.array([all(read(image).matches(scene)[a] for a in attributes)
                     for image, scene in zip(images, scenes)], dtype=bool)


def verified_pairs(unet, text_encoder, vae, tokenize: Callable[[list[str]], torch.Tensor], n: int, seed: int,
                   ode_steps: int, guidance: float, attributes: tuple[str, ...], gen: torch.Generator,
                   chunk: int = 512, max_draws: int = 8) -> dict[str, torch.Tensor]:
    """n pairs {noise, ends, ids} from the teacher's `ode_steps`-step ODE with CFG, for training-split captions
    drawn from `seed`, keeping those `accepted` on `attributes` (every pair with ()). Also returns
    `acceptance`, the fraction kept. Draws in chunks until n are kept; more than `max_draws` × n draws means the
    teacher rarely draws what it is asked, and stops the recipe rather than train on a sliver of its output."""
    rng = np.random.default_rng(seed)
    empty_ids = tokenize([""])[0]
    kept: dict[str, list[torch.Tensor]] = {"noise": [], "ends": [], "ids": []}
    drawn = hits = 0
    while hits < n:
        if drawn >= max_draws * n:
            raise RuntimeError(f"the teacher drew only {hits} of {drawn} captions right; {n} were needed")
        scenes = [sample_scene(rng) for _ in range(chunk)]
        ids = tokenize([scene.caption(rng) for scene in scenes])  # (chunk, L)
        noise, ends = make_pairs(unet, text_encoder, ids, empty_ids, ode_steps, guidance, gen)
        ok = torch.from_numpy(accepted(decode(vae, ends), scenes, attributes)).to(ends.device)
        for key, value in zip(kept, (noise, ends, ids)):
            kept[key].append(value[ok])
        drawn, hits = drawn + chunk, hits + int(ok.sum())
    out = {key: torch.cat(values)[:n] for key, values in kept.items()}
    out["acceptance"] = torch.tensor([hits / drawn])
    return out
