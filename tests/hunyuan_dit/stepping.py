"""A running batch stepped to its end through the step-level interface, for tests that join rows to it or
release rows from it first: float pictures, for comparisons finer than uint8's levels, or final latents."""
from typing import Callable

import torch

from rfserve.model_zoo.running import Running


def latents(running: Running, done: list[int]) -> list[torch.Tensor]:
    """The finished rows' latents (1, C, h, w), which then leave (unpinning what they hold, LoRA slots included)."""
    out = [running.rows["x"][i:i + 1] for i in done]
    running.leave(done)
    return out


def rest_of(pipe, running: Running, take: Callable[[Running, list[int]], list] | None = None) -> list:
    """Step `running` until every row has taken its steps, taking each row as it finishes (`take`, which makes the
    rows leave: by default `pipe.decoded`, (3, H, W) in [0, 1] as `Stepped.run` has them before rounding to
    uint8); returned in the order the rows stand now."""
    take = take or pipe.decoded
    ids, out = list(range(len(running))), {}
    while len(running):
        done = running.finished()
        if not done:
            pipe.step(running)
            continue
        out.update(zip([ids[i] for i in done], take(running, done)))
        ids = [spec for i, spec in enumerate(ids) if i not in set(done)]
    return [out[i] for i in range(len(out))]
