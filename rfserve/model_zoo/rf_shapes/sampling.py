"""The InstaFlow sampling semantics on in-memory components: text encoding, the Euler loop, decoding.

Training uses it to draw reflow/distillation pairs from a teacher's ODE, and evaluation uses it
before the serving pipeline exists. It matches `RectifiedFlowPipeline`: UNet timestep
(1 - i/N) * 1000 with 1000 at pure noise, x += v / N, CFG as v_neg + g * (v_cond - v_neg).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from rfserve.model_zoo.seeding import initial_noise

from .data import asked_count

if TYPE_CHECKING:
    from .counter import CountGuide


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) last hidden states for prompts padded to the tokenizer's max length."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def euler_sample(unet, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                 steps: int, guidance: float,
                 steer: Callable[[torch.Tensor, float], torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from noise to data in `steps` Euler steps; returns latents (B, C, h, w).

    `steer(x, t)`, at progress t (0 = noise), adds a velocity of its own to every step's (count guidance)."""
    use_cfg = guidance > 1.0 and uncond is not None
    emb = torch.cat([uncond, cond]) if use_cfg else cond  # (2B or B, L, D)
    x = noise
    for i in range(steps):
        t = (1.0 - i / steps) * 1000.0
        x_in = torch.cat([x, x]) if use_cfg else x
        v = unet(x_in, torch.full((x_in.shape[0],), t, device=x.device), encoder_hidden_states=emb).sample
        if use_cfg:
            v_neg, v_cond = v.chunk(2)
            v = v_neg + guidance * (v_cond - v_neg)
        if steer is not None:
            v = v + steer(x, i / steps)
        x = x + v / steps
    return x


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
    img = vae.decode(latents / vae.config.scaling_factor).sample
    img = (img / 2 + 0.5).clamp(0, 1)
    return (img.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (B, H, W, 3)


def generate(components: dict, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
             negative_prompt: str = "", batch: int = 64, count_guide: CountGuide | None = None) -> np.ndarray:
    """Images for prompts and per-image seeds, in chunks of `batch`; uint8 (B, H, W, 3). `count_guide` steers each
    image towards the count its prompt asks for, as the serving pipeline does."""
    unet, vae = components["unet"], components["vae"]
    tok, te = components["tokenizer"], components["text_encoder"]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i:i + batch], seeds[i:i + batch]
        cond = encode_text(tok, te, p)
        uncond = encode_text(tok, te, [negative_prompt] * len(p)) if guidance > 1.0 else None
        noise = initial_noise(s, shape, dtype=torch.float32, device=unet.device)
        counts = [asked_count(q) for q in p]
        steer = None if count_guide is None else lambda x, t: count_guide.rows_velocity(x, [t] * len(x), counts)
        out.append(decode(vae, euler_sample(unet, noise, cond, uncond, steps, guidance, steer)))
    return np.concatenate(out)
