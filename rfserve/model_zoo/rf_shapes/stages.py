"""The training stages: VAE, 1-RF teacher, reflow pairs, 2-RF (annealing reflow), one-step distillation.
(The counting classifier is in `counter.py`, and the tuning of the one-step model in `tuning.py`.)

RF convention throughout (matches the sampler): t in [0, 1] with 0 = noise,
x_t = t * x_data + (1 - t) * noise, UNet timestep (1 - t) * 1000, target v = x_data - noise.

Random numbers come from CPU generators on every device and are then moved, so a CPU run is bit-for-bit
reproducible and a GPU run draws the same noise, batches and timesteps.
"""
from __future__ import annotations

import copy
import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import StageConfig
from .sampling import euler_sample

if TYPE_CHECKING:
    from .counter import CountGuide


def _randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device)


def _schedule(cfg: StageConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's weights, with the usual short-run warmup of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.source, self.decay, self.updates = module, decay, 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), self.source.parameters()):
            e.lerp_(p.detach(), 1 - d)


def _fit(name: str, params: list, cfg: StageConfig, loss_fn, log: list, gen: torch.Generator,
         ema: EMA | None = None, checkpoint: Path | None = None, every: int = 250,
         alongside: list | None = None, alongside_lr_scale: float = 1.0) -> None:
    """Generic loop: AdamW + schedule; `loss_fn(step)` computes the batch loss from `gen`; mean losses go to `log`.
    `alongside`: parameters of a second model trained by the same loss (the tuning's fake flow), in a parameter group
    of their own whose gradient is clipped on its own, so neither model's gradient scales the other's step, and whose
    learning rate is `alongside_lr_scale` times the first's.

    With `checkpoint`, the whole loop state (weights, optimizer, schedule, EMA, generator, log) is saved there every
    `every` steps and picked up again when the file exists, so a stage stopped part-way resumes in a later run where
    it stopped, and ends with the weights an unbroken run has."""
    groups = [params] + ([alongside] if alongside else [])
    every_param = [p for group in groups for p in group]
    scales = (1.0, alongside_lr_scale)
    opt = torch.optim.AdamW([{"params": group, "lr": cfg.lr * scale} for group, scale in zip(groups, scales)],
                            lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(cfg, s))
    running: list[float] = []
    start, seconds, began = 0, 0.0, time.perf_counter()
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the generator stays on the CPU
        with torch.no_grad():
            for p, saved in zip(every_param, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
            ema.updates = state["ema_updates"]
        gen.set_state(state["gen"])
        log[:], running, start, seconds = state["log"], state["running"], state["step"], state["seconds"]
    bar = tqdm(range(start, cfg.steps), desc=name, mininterval=5, initial=start, total=cfg.steps)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "loss": float(np.mean(running))})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            running = []
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < cfg.steps:
            state = {"step": step + 1, "seconds": seconds + time.perf_counter() - began,
                     "params": [p.detach() for p in every_param], "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "gen": gen.get_state(), "log": log, "running": running,
                     "ema": ema.module.state_dict() if ema is not None else {},
                     "ema_updates": ema.updates if ema is not None else 0}
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # a stop while saving keeps the last whole file


def _edge_weights(x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 + edge_weight where a 3x3 neighbourhood holds two colours (shape outlines)."""
    spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)  # (B, 3, H, W): local max - min
    return 1 + edge_weight * (spread.sum(1, keepdim=True) > 0.2).float()


def _outline_loss(rec: torch.Tensor, x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    w = _edge_weights(x, edge_weight)
    err = (rec - x).abs()
    return (w * (err + err ** 2)).mean() / w.mean()


def train_vae(vae, images: torch.Tensor, cfg: StageConfig, kl_weight: float, edge_weight: float,
              gen: torch.Generator, log: list, checkpoint: Path | None = None):
    """images: (N, 3, 64, 64) in [-1, 1]. L1 + L2 reconstruction weighted towards shape outlines, since the
    outline is what tells a square from a circle (plain MSE learns flat colour first and edges last), plus the
    small KL of the SD autoencoder."""
    vae.train()

    def loss_fn(step):
        x = images[torch.randint(len(images), (cfg.batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        return _outline_loss(rec, x, edge_weight) + kl_weight * post.kl().mean()

    _fit("vae", list(vae.parameters()), cfg, loss_fn, log, gen, checkpoint=checkpoint)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled posterior modes (N, C, h, w)."""
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])


def _rf_loss(unet, x_data, noise, emb, gen) -> torch.Tensor:
    t = torch.rand(len(x_data), generator=gen).to(x_data.device)  # (B,), 0 = noise
    tb = t.view(-1, 1, 1, 1)
    x_t = tb * x_data + (1 - tb) * noise
    v = unet(x_t, (1 - t) * 1000, encoder_hidden_states=emb).sample
    return F.mse_loss(v, x_data - noise)


def _drop_captions(ids: torch.Tensor, empty_ids: torch.Tensor, p: float, gen) -> torch.Tensor:
    """Replace each row of token ids by the empty caption with probability p (for CFG)."""
    drop = (torch.rand(len(ids), generator=gen) < p).to(ids.device)
    return torch.where(drop[:, None], empty_ids[None], ids)


def train_teacher(unet, text_encoder, latents, ids, empty_ids, cfg: StageConfig, dropout: float, gen, log,
                  checkpoint: Path | None = None):
    """1-RF: independent (noise, data) coupling; the text encoder learns jointly. Returns both EMA copies."""
    both = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train()
    ema = EMA(both, cfg.ema)

    def loss_fn(step):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x = latents[idx]
        emb = text_encoder(_drop_captions(ids[idx], empty_ids, dropout, gen))[0]
        loss = _rf_loss(unet, x, _randn(x.shape, gen, x.device), emb, gen)
        return loss

    _fit("1-rf teacher", list(both.parameters()), cfg, loss_fn, log, gen, ema, checkpoint)
    return ema.module["unet"], ema.module["text_encoder"]


@torch.no_grad()
def make_pairs(unet, text_encoder, ids, empty_ids, ode_steps: int, guidance: float, gen, batch: int = 128,
               counts: torch.Tensor | None = None, count_guide: CountGuide | None = None):
    """Reflow pairs (noise, ODE endpoint) from a teacher, with CFG against the empty caption, and with
    `count_guide` steering each ODE towards its caption's count (`counts`, (N,))."""
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = _randn((len(ids), *shape), gen, unet.device)
    uncond = text_encoder(empty_ids[None])[0]  # (1, L, D)
    ends = []
    for i in tqdm(range(0, len(ids), batch), desc=f"pairs ({ode_steps}-step ODE)", mininterval=5):
        cond = text_encoder(ids[i:i + batch])[0]
        steer = None if count_guide is None else partial(count_guide.velocity, counts=counts[i:i + batch])
        ends.append(euler_sample(unet, noise[i:i + batch], cond, uncond.expand_as(cond), ode_steps, guidance, steer))
    return noise, torch.cat(ends)


def train_reflow(unet, text_encoder, noise, ends, ids, empty_ids, cfg: StageConfig, dropout: float,
                 anneal_fraction: float, gen, log, checkpoint: Path | None = None):
    """2-RF on teacher pairs. SlimFlow's annealing reflow: the pair's noise is blended with fresh noise,
    sqrt(1 - b^2) z_pair + b z_fresh, with b annealed 1 -> 0 over the first `anneal_fraction` of steps,
    so training moves smoothly from the teacher's independent coupling to the straight reflow coupling."""
    unet.train().requires_grad_(True)
    ema = EMA(unet, cfg.ema)
    anneal_steps = max(int(anneal_fraction * cfg.steps), 1)

    def loss_fn(step):
        idx = torch.randint(len(noise), (cfg.batch,), generator=gen)
        b = max(0.0, 1.0 - step / anneal_steps)
        z = math.sqrt(1 - b * b) * noise[idx] + b * _randn(noise[idx].shape, gen, noise.device)
        with torch.no_grad():
            emb = text_encoder(_drop_captions(ids[idx], empty_ids, dropout, gen))[0]
        loss = _rf_loss(unet, ends[idx], z, emb, gen)
        return loss

    _fit("2-rf", list(unet.parameters()), cfg, loss_fn, log, gen, ema, checkpoint)
    return ema.module


def train_one_step(unet, text_encoder, noise, ends, ids, cfg: StageConfig, gen, log, checkpoint: Path | None = None):
    """Distillation: one Euler step from pure noise (UNet timestep 1000) must land on the 2-RF ODE endpoint."""
    unet.train().requires_grad_(True)
    ema = EMA(unet, cfg.ema)

    def loss_fn(step):
        idx = torch.randint(len(noise), (cfg.batch,), generator=gen)
        with torch.no_grad():
            emb = text_encoder(ids[idx])[0]
        return F.mse_loss(one_step(unet, noise[idx], emb), ends[idx])

    _fit("one-step distill", list(unet.parameters()), cfg, loss_fn, log, gen, ema, checkpoint)
    return ema.module


def one_step(unet, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The one-step model's latents (B, C, h, w): one Euler step from pure noise z, at UNet timestep 1000."""
    return z + unet(z, torch.full((len(z),), 1000.0, device=z.device), encoder_hidden_states=emb).sample
