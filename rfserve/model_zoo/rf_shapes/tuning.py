"""The last stage of the one-step model (issue #35): tuning on fresh noise, with the counting classifier's reward and
distribution matching against the 2-RF.

Why: a student fitted to its teacher's pairs draws the right count on those noises, but on fresh noise it draws its
teacher's count only about 3 times in 4, and guidance cannot steer a single step (`benchmarks/RESULTS.md`). Nor is
a student of 12,288 pairs as sharp as its teacher: on fresh noise it draws ghost blobs and fringed, rounded outlines,
which the checker reads as wrong shapes and the Fréchet distance as far from real. Half of each batch keeps the
distillation loss on the pairs; the other half draws fresh noise and training-split captions, where

- `Reward` adds the counting classifier's cross-entropy for the caption's count, a differentiable reward as in
  reward-guided distillation;
- `Matching` adds distribution matching distillation (DMD, Yin et al. 2024): a fake flow, a copy of the 2-RF,
  follows the student's outputs, and the student moves along the difference between the guided 2-RF's denoised
  estimate of its noised output and the fake's, towards samples the 2-RF would draw: with CFG and, as the server
  samples it, the count guide. The distillation loss on the pairs is DMD's regression term;
- `Adversarial` adds DMD2's GAN term (Yin et al. 2024b): a head on the fake flow's bottleneck tells noised renders of
  real scenes from noised student outputs, each under its own caption, and the student learns to pass for real. DMD
  matches the 2-RF's distribution, flaws and all; renders of the caption are what the checker and the FD compare with.

Conventions are the stages': t in [0, 1] with 0 = noise, x_t = t·x_data + (1 − t)·noise, UNet timestep (1 − t)·1000.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import StageConfig
from .counter import CountGuide, noised
from .stages import EMA, _fit, _randn, one_step

MATCH_T = (0.02, 0.98)  # DMD's range of t: its timesteps 20 to 980 of 1,000
# The GAN head reads progress 0.5 to 1, nearer the data than DMD2's full range: what tells the one-step model's
# outputs from renders is fine detail, lost in noise. Trained on its loss alone against the last shipped model's outputs
# (batch 32, lr 1e-4), the head and fake took that loss from 1.39 to 0.89 in 150 steps here, and over MATCH_T only to
# 1.36 in 100.
GAN_T = (0.5, 1.0)


@dataclass(frozen=True)
class Reward:
    """`weight` times `classifier`'s cross-entropy for the count each fresh caption asks for, read on the output
    noised to a progress in `t_range`: at t = 1 the classifier reads the latent's fine detail, which the student then
    learns to fool (in pilots colour and FD paid for it); noised, it reads blobs."""
    classifier: nn.Module
    weight: float
    t_range: tuple[float, float]


@dataclass(frozen=True)
class Matching:
    """DMD against `teacher` (the 2-RF, frozen) with CFG `guidance` against `uncond` (the empty caption's (1, L, D)
    embedding), weighted by `weight`; `fake` starts as a copy of the teacher and is trained as the student is.
    `count_guide`, where given, steers the teacher's velocity towards each caption's count as the served 2-RF's
    sampler does, so that the student matches the distribution users get from the 2-RF, not the unguided one's.
    The fake (and a GAN head on it) learns at `fake_lr_scale` times the student's rate, DMD2's two time-scale rule:
    DMD's step reads the fake as the student's distribution now, and a fake that lags reads an older one."""
    teacher: nn.Module
    fake: nn.Module
    uncond: torch.Tensor
    guidance: float
    weight: float
    count_guide: CountGuide | None = None
    fake_lr_scale: float = 1.0


@dataclass(frozen=True)
class Adversarial:
    """DMD2's GAN term: `head` maps the fake flow's mid-block features to a logit, real for `latents` (N, C, h, w),
    the VAE's latents of rendered scenes with captions `ids` (N, L). The head and the fake learn to tell them from the
    student's outputs, weighted by `head_weight`; the student learns to pass for real, weighted by `weight`. Needs
    `Matching`'s fake flow."""
    head: nn.Module
    latents: torch.Tensor
    ids: torch.Tensor
    weight: float
    head_weight: float


def discriminator_head(channels: int, size: int) -> nn.Module:
    """Mid-block features (B, channels, size, size) -> logits (B, 1); flattened rather than pooled, so where each blob
    sits counts."""
    return nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                         nn.Flatten(), nn.Linear(channels * size * size, 1))


def _uniform(n: int, t_range: tuple[float, float], gen: torch.Generator, device) -> torch.Tensor:
    low, high = t_range
    return (low + (high - low) * torch.rand(n, generator=gen)).to(device)


def _matching_losses(m: Matching, x: torch.Tensor, emb: torch.Tensor, counts: torch.Tensor, gen: torch.Generator):
    """(the student's DMD loss, the fake flow's flow-matching loss) for one-step outputs x (B, C, h, w) of captions
    emb (B, L, D) that ask for counts (B,). Only the first reaches the student and only the second the fake."""
    sample = x.detach()
    t = _uniform(len(x), MATCH_T, gen, x.device)
    z = _randn(x.shape, gen, x.device)
    tb = t.view(-1, 1, 1, 1)
    v_fake = m.fake(tb * sample + (1 - tb) * z, (1 - t) * 1000, encoder_hidden_states=emb).sample
    fake_loss = F.mse_loss(v_fake, sample - z)  # the fake flow follows the student's outputs

    t = _uniform(len(x), MATCH_T, gen, x.device)
    tb, xt = t.view(-1, 1, 1, 1), noised(sample, t, gen)
    with torch.no_grad():
        v = m.teacher(torch.cat([xt, xt]), torch.cat([(1 - t) * 1000] * 2),
                      encoder_hidden_states=torch.cat([m.uncond.expand_as(emb), emb])).sample  # (2B, C, h, w)
        v_neg, v_cond = v.chunk(2)
        v = v_neg + m.guidance * (v_cond - v_neg)
        if m.count_guide is not None:
            v = v + m.count_guide.velocity(xt, t, counts)
        real = xt + (1 - tb) * v  # denoised estimates of x
        fake = xt + (1 - tb) * m.fake(xt, (1 - t) * 1000, encoder_hidden_states=emb).sample
        # DMD's normalisation: the step is relative to how far the sample is from the real estimate
        step = (fake - real) / (sample - real).abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-3)
    return 0.5 * F.mse_loss(x, sample - step), fake_loss


def _logits(fake: nn.Module, head: nn.Module, x: torch.Tensor, emb: torch.Tensor, gen: torch.Generator):
    """The head's logits (B,) on the fake's mid-block features for x noised to a progress in GAN_T."""
    t = _uniform(len(x), GAN_T, gen, x.device)
    features = []
    hook = fake.mid_block.register_forward_hook(lambda module, args, out: features.append(out))
    try:
        fake(noised(x, t, gen), (1 - t) * 1000, encoder_hidden_states=emb)
    finally:
        hook.remove()
    return head(features[0]).flatten()


def _adversarial_losses(a: Adversarial, m: Matching, x: torch.Tensor, emb: torch.Tensor,
                        real: torch.Tensor, real_emb: torch.Tensor, gen: torch.Generator):
    """(the student's GAN loss, the head's and m's fake's) for one-step outputs x of captions emb and real latents of
    captions real_emb, non-saturating as in DMD2. The student's loss reads the head and fake frozen, so it moves only
    the student; the head's sees only x's values."""
    head_loss = (F.softplus(-_logits(m.fake, a.head, real, real_emb, gen)).mean()
                 + F.softplus(_logits(m.fake, a.head, x.detach(), emb, gen)).mean())
    m.fake.requires_grad_(False), a.head.requires_grad_(False)
    try:
        student_loss = F.softplus(-_logits(m.fake, a.head, x, emb, gen)).mean()
    finally:
        m.fake.requires_grad_(True), a.head.requires_grad_(True)
    return student_loss, head_loss


def tune_one_step(unet, text_encoder, noise: torch.Tensor, ends: torch.Tensor, ids: torch.Tensor,
                  fresh_ids: torch.Tensor, fresh_counts: torch.Tensor, reward: Reward | None,
                  matching: Matching | None, cfg: StageConfig, gen: torch.Generator, log: list,
                  checkpoint: Path | None = None, adversarial: Adversarial | None = None):
    """The one-step model tuned on the pairs (noise, ends, ids) and on fresh noise with the captions fresh_ids (asking
    for fresh_counts), by `reward`, `matching` and `adversarial`, each where given (`adversarial` only with
    `matching`); returns the EMA weights. The fake flow and the head train alongside in the same loop, so a stopped
    stage resumes with them."""
    if adversarial is not None and matching is None:
        raise ValueError("the adversarial head reads the fake flow, which only distribution matching trains")
    unet.train().requires_grad_(True)
    ema, half = EMA(unet, cfg.ema), cfg.batch // 2
    alongside = []
    if matching is not None:
        matching.fake.train().requires_grad_(True)
        alongside += list(matching.fake.parameters())
    if adversarial is not None:
        adversarial.head.train().requires_grad_(True)
        alongside += list(adversarial.head.parameters())

    def loss_fn(step):
        idx = torch.randint(len(noise), (half,), generator=gen)
        fresh = torch.randint(len(fresh_ids), (half,), generator=gen).to(fresh_ids.device)
        counts = fresh_counts[fresh]
        with torch.no_grad():
            emb = text_encoder(torch.cat([ids[idx], fresh_ids[fresh]]))[0]  # (2 * half, L, D)
        paired = noise[idx]
        z = torch.cat([paired, _randn(paired.shape, gen, noise.device)])  # (2 * half, C, h, w)
        x = one_step(unet, z, emb)
        loss = F.mse_loss(x[:half], ends[idx])
        if reward is not None:
            t = _uniform(half, reward.t_range, gen, x.device)
            loss = loss + reward.weight * F.cross_entropy(reward.classifier(noised(x[half:], t, gen), t),
                                                          counts)
        if matching is not None:
            student_loss, fake_loss = _matching_losses(matching, x[half:], emb[half:], counts, gen)
            loss = loss + matching.weight * student_loss + fake_loss
        if adversarial is not None and matching is not None:
            real = torch.randint(len(adversarial.latents), (half,), generator=gen).to(adversarial.latents.device)
            with torch.no_grad():
                real_emb = text_encoder(adversarial.ids[real])[0]  # (half, L, D)
            student_loss, head_loss = _adversarial_losses(adversarial, matching, x[half:], emb[half:],
                                                          adversarial.latents[real], real_emb, gen)
            loss = loss + adversarial.weight * student_loss + adversarial.head_weight * head_loss
        return loss

    _fit("one-step tuning", list(unet.parameters()), cfg, loss_fn, log, gen, ema, checkpoint, alongside=alongside,
         alongside_lr_scale=1.0 if matching is None else matching.fake_lr_scale)
    return ema.module
