"""A classifier that counts the shapes in a noisy latent, and the sampler guidance it gives; it also rewards the
one-step model's counts in `tuning.py`.

Why it exists: the caption's count word teaches the UNet each count's shape *size* (the grammar draws more shapes
smaller), not the number; the number follows the noise, and is settled within the first few Euler steps
(`benchmarks/RESULTS.md`, issue #35). A small CNN trained on renders where size says little about number (0 to
`MAX_COUNT` shapes, each count at several of the grammar's sizes) counts blobs in x_t, and its gradient steers the
ODE towards the caption's count: classifier guidance, written for the rectified-flow velocity.

Conventions are the stages': t in [0, 1] with 0 = noise, x_t = t·x_data + (1 − t)·noise.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import StageConfig
from .data import RADIUS_RANGE, render, sample_scene
from .stages import _fit, _randn

MAX_COUNT = 5  # two past the grammar's three, so that drawing one shape too many is visible to the classifier
SIZE_RANGES = tuple(RADIUS_RANGE.values())  # the grammar's shape sizes, largest first
T_FLOOR = 0.05  # the guidance factor (1 − t)/t is capped at (1 − T_FLOOR)/T_FLOOR = 19 near pure noise


def counting_set(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n renders (uint8 (n, 64, 64, 3)) of 0 to MAX_COUNT shapes and their counts (int64 (n,)).

    Scenes come from the training split. Each count is drawn at every grammar size it fits in (four shapes only in
    the two smaller sizes, five in the smallest), so that size does not give the number away."""
    rng = np.random.default_rng(seed)
    images, counts = [], []
    for _ in range(n):
        count = int(rng.integers(MAX_COUNT + 1))
        sizes = SIZE_RANGES[max(0, count - 3):]
        scene = replace(sample_scene(rng), count=count)
        images.append(render(scene, rng, sizes[int(rng.integers(len(sizes)))]))
        counts.append(count)
    return np.stack(images), np.array(counts, dtype=np.int64)


class _Block(nn.Module):
    """Pre-norm residual conv block whose normalised activations are scaled and shifted by t (FiLM)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(8, width, affine=False), nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)  # (B, W, 1, 1) each
        return x + self.conv(F.silu(self.norm(x) * (1 + scale) + shift))


class CountClassifier(nn.Module):
    """logits (B, MAX_COUNT + 1) of the number of shapes in x_t (B, C, 16, 16), at progress t (B,).

    Three levels (16×16, 8×8, 4×4) then a global mean: a count is a sum over the image, which pooling gives and
    a CNN's local features alone do not."""

    def __init__(self, latent_channels: int, width: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.blocks = nn.ModuleList(_Block(width) for _ in range(3))
        self.down = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(2))
        self.head = nn.Linear(width, MAX_COUNT + 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t.view(-1, 1).to(x.dtype))  # (B, W)
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i < len(self.down):
                h = self.down[i](F.silu(h))  # halves h and w
        return self.head(F.silu(h).mean(dim=(2, 3)))  # (B, W, h, w) -> (B, W) -> (B, classes)


def noised(latents: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    tb = t.view(-1, 1, 1, 1)
    return tb * latents + (1 - tb) * _randn(latents.shape, gen, latents.device)


def train_counter(classifier: CountClassifier, latents: torch.Tensor, counts: torch.Tensor, cfg: StageConfig,
                  gen: torch.Generator, log: list, checkpoint: Path | None = None) -> CountClassifier:
    """Cross-entropy on (scaled) latents noised to a uniform t: guidance needs the count at every point of the
    path, not only on clean latents."""
    classifier.train()

    def loss_fn(step):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        t = torch.rand(cfg.batch, generator=gen).to(latents.device)
        return F.cross_entropy(classifier(noised(latents[idx], t, gen), t), counts[idx])

    _fit("count classifier", list(classifier.parameters()), cfg, loss_fn, log, gen, checkpoint=checkpoint)
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(classifier: CountClassifier, latents: torch.Tensor, counts: torch.Tensor, t: float,
             gen: torch.Generator) -> float:
    """Share of latents noised to progress t whose count the classifier reads right."""
    tt = torch.full((len(latents),), t, device=latents.device)
    return (classifier(noised(latents, tt, gen), tt).argmax(1) == counts).float().mean().item()


class CountGuide:
    """The velocity that steers an ODE step towards `counts` shapes.

    For x_t = t·x₁ + (1 − t)·z the velocity is v = (x + (1 − t)·∇log p_t(x))/t, so conditioning on the count adds
    (1 − t)/t · ∇log p(count | x_t) to it; `scale` (γ) multiplies that, as a CFG scale does. γ = 10 took the
    shipped 2-RF's count from 0.71 to 0.90 at 25 steps (0.88 at 12), shape held; γ ≥ 30 breaks the images."""

    def __init__(self, classifier: CountClassifier, scale: float):
        self.classifier, self.scale = classifier.eval().requires_grad_(False), scale

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) at progress t (one for all rows, or (B,) per row), counts (B,) -> the added velocity
        (B, C, h, w), in x's dtype. The classifier runs in float32 and with autograd on, even where the caller
        samples in half precision under inference mode, as the server does."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(len(x))  # (B,)
        with torch.inference_mode(False), torch.enable_grad():  # clones: autograd saves no inference tensor
            x_in = x.detach().float().clone().requires_grad_(True)
            logits = self.classifier(x_in, t.clone())
            chosen = logits.log_softmax(1).gather(1, counts.view(-1, 1).clone()).sum()
            (grad,) = torch.autograd.grad(chosen, x_in)
        factor = self.scale * (1 - t) / t.clamp(min=T_FLOOR)  # (B,)
        return (factor.view(-1, 1, 1, 1) * grad).to(x.dtype)

    def rows_velocity(self, x: torch.Tensor, progress: list[float], counts: list[int | None]) -> torch.Tensor:
        """`velocity` for rows x (B, C, h, w), each at its own progress towards its own count (`data.asked_count`
        of its prompt); zero for the rows that ask for none."""
        out = torch.zeros_like(x)
        rows = [i for i, c in enumerate(counts) if c is not None]
        if rows:
            asked = torch.tensor([counts[i] for i in rows], device=x.device)
            out[rows] = self.velocity(x[rows], torch.tensor([progress[i] for i in rows], device=x.device), asked)
        return out
