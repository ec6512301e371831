"""Classifier-free guidance on the transformer's epsilon/v output.

This is the one place the two CFG halves are combined, so a fused kernel can replace it.
`kernels.cfg_euler_step` does not apply: it fuses guidance with an Euler update, while the
DDPM/DDIM/DPM steps here are the scheduler's own (variance noise, multistep history), so the
combination stays a separate torch function.
"""
from __future__ import annotations

import torch


def guided_prediction(pred: torch.Tensor, guidance: torch.Tensor | float,
                      rescale: float = 0.0) -> torch.Tensor:
    """pred: (2B, C, h, w), unconditional half first -> (B, C, h, w) = u + g·(c − u).
    `guidance` is a float or one scale per image, (B,). With `rescale` > 0 the result's
    per-image std is pulled toward the conditional one (diffusers' rescale_noise_cfg)."""
    uncond, cond = pred.chunk(2)
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(pred.dtype).view(-1, *[1] * (pred.ndim - 1))   # (B, 1, 1, 1)
    guided = uncond + guidance * (cond - uncond)
    if rescale > 0.0:
        dims = list(range(1, pred.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided
