"""What every sampler's step shares: the forward's rows with and without guidance, the rectified-flow velocity
update (which the fused kernels of `kernels/` make one pass over memory) applied per group of rows at the same
point of their schedules, and the straight-line preview."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch

from rfserve import kernels

if TYPE_CHECKING:
    from rfserve.model_zoo.base import ImageSpec


def guided_rows(specs: Sequence[ImageSpec]) -> list[int]:
    """The rows that use guidance (`ImageSpec.uses_cfg`): those a forward gives an unconditional copy."""
    return [i for i, spec in enumerate(specs) if spec.uses_cfg]


def with_uncond(t: torch.Tensor, cfg: list[int], uncond: torch.Tensor | None = None) -> torch.Tensor:
    """A forward's rows for a batch whose rows `cfg` use guidance: the unconditional copies of those rows first,
    then every row, (len(cfg) + B, ...). `uncond` holds the unconditional rows' own values (the negative prompt's
    embedding, for every row); without it they copy the rows themselves. Rows without guidance carry no
    unconditional branch, so they cost one row of the forward, not two."""
    if not cfg:
        return t
    return torch.cat([(t if uncond is None else uncond)[cfg], t])


Update = Callable[[torch.Tensor, torch.Tensor, Hashable, "torch.Tensor | float | None"], torch.Tensor]


def grouped_update(x: torch.Tensor, out: torch.Tensor, cfg: list[int], keys: list[Hashable],
                   guidance: list[float], update: Update) -> torch.Tensor:
    """x (B, ...) after one step, from a forward's `out` laid out by `with_uncond`. `update(x_g, out_g, key, g)`
    runs once per group of rows that share `keys[i]` (their step's scalars: a step size, a timestep) and whether
    they use guidance: a guided group gets out_g (2b, ...) as [unconditional; conditional] and g a float or (b,)
    scale, an unguided one out_g (b, ...) and None. The fused kernels take one step size per launch, so this
    is how rows at different points of different schedules share a forward; a batch whose rows agree is one
    group and runs exactly as a whole batch did."""
    n, where = len(cfg), {row: j for j, row in enumerate(cfg)}
    groups: dict[tuple[bool, Hashable], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault((i in where, key), []).append(i)
    if len(groups) == 1:
        ((guided, key),) = groups
        return update(x, out, key, guidance_tensor(guidance, x.device) if guided else None)
    new = torch.empty_like(x)
    for (guided, key), rows in groups.items():
        cond = out[n:][rows]
        if guided:
            out_g = torch.cat([out[[where[r] for r in rows]], cond])                  # (2b, ...)
            new[rows] = update(x[rows], out_g, key, guidance_tensor([guidance[r] for r in rows], x.device))
        else:
            new[rows] = update(x[rows], cond, key, None)
    return new


def per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One float per row as a (B, 1, ..., 1) tensor in `like`'s dtype, to scale its rows."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).to(like.dtype).view(-1, *[1] * (like.ndim - 1))


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


def straight_ahead(x_prev: torch.Tensor, x: torch.Tensor, rows: list[int], ahead: list[float]) -> torch.Tensor:
    """The clean latent of `rows` where the flow is straight: each row's last step (from x_prev to x) continued
    `ahead` times its own length, the progress it has left over the progress of that step. For InstaFlow that is
    x̂₁ = x_t + (1 − t)·v."""
    return x[rows] + (x[rows] - x_prev[rows]) * per_row(ahead, x)
