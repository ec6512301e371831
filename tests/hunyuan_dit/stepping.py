"""A running batch stepped to its end through the step-level interface, for tests that join rows to it or
release rows from it first: float pictures, for comparisons finer than uint8's levels."""
import torch

from rfserve.model_zoo.running import Running


def rest_of(pipe, running: Running) -> list[torch.Tensor]:
    """Step `running` until every row has taken its steps, decoding each row (3, H, W) in [0, 1] as it finishes,
    as `Stepped.run` does before rounding to uint8; returned in the order the rows stand now."""
    ids, out = list(range(len(running))), {}
    while len(running):
        done = running.finished()
        if not done:
            pipe.step(running)
            continue
        out.update(zip([ids[i] for i in done], pipe.decoded(running, done)))
        ids = [spec for i, spec in enumerate(ids) if i not in set(done)]
    return [out[i] for i in range(len(out))]
