"""The rectified-flow velocity update. Every sampler calls it, so the fused kernels of
`kernels/` replace the whole guidance + Euler step in one pass over memory."""
from __future__ import annotations

import torch

import kernels


def guidance_tensor(scales: list[float], device) -> torch.Tensor | float:
    """One scale per row; a plain float when the batch agrees, so kernels take a scalar."""
    if len(set(scales)) == 1:
        return float(scales[0])
    return torch.tensor(scales, dtype=torch.float32, device=device)


def euler_update(x: torch.Tensor, v: torch.Tensor, dt: float,
                 guidance: torch.Tensor | float | None = None) -> torch.Tensor:
    """x + dt·v. With guidance, v is the (2B, ...) output with the unconditional half
    first and the step is x + dt·(v_u + g·(v_c − v_u))."""
    if guidance is None:
        return x + dt * v
    return kernels.cfg_euler_step(x, v, dt, guidance)
