"""The rectified-flow velocity update. Every sampler calls it, so the fused kernels of
`kernels/` replace the whole guidance + Euler step in one pass over memory."""
from __future__ import annotations

import torch

from rfserve import kernels
def keep_rows(keep: list[int], t, groups: int = 1):
    """Rows `keep` of a batch that `between_steps()` shrank. `t` is batch-first, `groups` stacked copies
    of the batch (2 for CFG's paired rows); a float guidance scale for the whole batch passes as it is."""
    if not isinstance(t, torch.Tensor):
        return t
    n = t.shape[0] // groups
    return t[[g * n + k for g in range(groups) for k in keep]]


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


def straight_ahead(x_prev: torch.Tensor, x: torch.Tensor, rows: list[int], remaining: float,
                   dt: float) -> torch.Tensor:
    """The clean latent of `rows` where the flow is straight: the last step (dt of progress, from x_prev to x)
    continued over the `remaining` progress. For InstaFlow that is x̂₁ = x_t + (1 − t)·v."""
    return x[rows] + (x[rows] - x_prev[rows]) * (remaining / dt)
