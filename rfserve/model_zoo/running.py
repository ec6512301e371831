"""A batch in flight, row by row: what a step-level pipeline (model_zoo.base.Pipeline) keeps between two steps.

Rows join (`extend`) and leave (`keep`) between any two steps, so every per-row quantity lives here, as a row of
a batch-first tensor or an entry of a per-row list, never as one value for the whole batch: each row has its own
step count, its own place in its schedule, its own guidance and its own edit strength. A pipeline's `step` reads
them per row, so a row computes what it would compute alone, whatever else shares its forward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol, TypeVar

import numpy as np
import torch

from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer

T = TypeVar("T")


@dataclass
class Running:
    specs: list[ImageSpec]
    truncated: list[bool]                     # the prompt was cut to what the model reads
    steps: list[int]                          # the steps each row takes in all (an edit: its share)
    rows: dict[str, Any]                      # batch-first tensors, lists with one entry per row, or `RowState`s
    done: list[int] = field(default_factory=list)     # the steps each row has taken
    timings: dict[str, float] = field(default_factory=dict)
    sync: Callable[[], None] | None = None    # waits for the device, so a stage's time includes its kernels

    def __post_init__(self) -> None:
        self.done = self.done or [0] * len(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def finished(self) -> list[int]:
        """The rows that have taken all their steps, ready for `Pipeline.finish`."""
        return [i for i, (done, steps) in enumerate(zip(self.done, self.steps)) if done >= steps]

    def stepping(self) -> list[int]:
        """The rows that still have steps to take."""
        return [i for i, (done, steps) in enumerate(zip(self.done, self.steps)) if done < steps]

    def stage(self, name: str) -> ContextManager[None]:
        """Time a stage of this batch (the steps: "sample") into its `timings`."""
        return StageTimer(self.sync, self.timings).stage(name)

    def advance(self) -> None:
        """Every row has taken one more step: the end of each `Pipeline.step`."""
        self.done = [d + 1 for d in self.done]

    def leave(self, rows: list[int]) -> None:
        """`rows` leave (finished, or their request is gone); the rest go on in order."""
        gone = set(rows)
        self.keep([i for i in range(len(self)) if i not in gone])

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (indices, in the order they stay) go on."""
        self.specs = [self.specs[i] for i in rows]
        self.truncated = [self.truncated[i] for i in rows]
        self.steps = [self.steps[i] for i in rows]
        self.done = [self.done[i] for i in rows]
        self.rows = {name: _take(value, rows) for name, value in self.rows.items()}

    def extend(self, other: "Running") -> None:
        """`other`'s rows join after these: they take their first step with this batch's next."""
        self.specs += other.specs
        self.truncated += other.truncated
        self.steps += other.steps
        self.done += other.done
        self.rows = {name: _join(value, other.rows[name]) for name, value in self.rows.items()}
        for stage, secs in other.timings.items():
            self.timings[stage] = self.timings.get(stage, 0.0) + secs


class RowState(Protocol):
    """Per-row state that is neither a tensor nor a list (a KV cache's rows, say) keeps and joins itself."""

    def take(self, rows: list[int]) -> "RowState": ...

    def join(self, other: "RowState") -> "RowState": ...


def _take(value: Any, rows: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value if rows == list(range(len(value))) else value[rows]
    if isinstance(value, list):
        return [value[i] for i in rows]
    return value.take(rows)


def _join(value: Any, other: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.cat([value, other.to(value.dtype)])
    if isinstance(value, list):
        return value + other
    return value.join(other)


class Stepped:
    """What a step-level pipeline does when no request joins or leaves: `run` begins the specs together and steps
    them to their ends, finishing each row as soon as it has taken its steps (so `step` always steps every row);
    `admit` begins the joiners and appends them."""

    def admit(self: Any, running: Running, specs: list[ImageSpec]) -> None:
        running.extend(self.begin(specs))

    def run(self: Any, specs: list[ImageSpec]) -> BatchOutput:
        parts, timings = self.to_end(specs, self.finish)
        pick = _spec_order(parts, len(specs))
        images = np.concatenate([out.images for _, out in parts])[pick]
        on_device = [out.device_images for _, out in parts]
        device = None if any(d is None for d in on_device) else torch.cat(on_device)[pick]
        for _, out in parts:
            for stage, secs in out.timings.items():
                timings[stage] = timings.get(stage, 0.0) + secs
        truncated = [flag for _, out in parts for flag in out.prompt_truncated]
        return BatchOutput(images, [truncated[k] for k in pick], timings, device)

    def to_end(self: Any, specs: list[ImageSpec], finish: Callable[[Running, list[int]], T]
               ) -> tuple[list[tuple[list[int], T]], dict[str, float]]:
        """`specs` begun and stepped to their ends; each group of rows that finished together, as (the specs'
        indices, what `finish` made of them), and the stage timings of the steps."""
        running = self.begin(specs)
        ids, parts = list(range(len(specs))), []                # the spec behind each running row
        while len(running):
            done = running.finished()
            if not done:
                with running.stage("sample"):
                    self.step(running)
                continue
            parts.append(([ids[i] for i in done], finish(running, done)))
            left = set(done)
            ids = [spec for i, spec in enumerate(ids) if i not in left]
        return parts, dict(running.timings)


def _spec_order(parts: list[tuple[list[int], Any]], n: int) -> list[int]:
    """For each spec, its row in the finished groups laid end to end."""
    where = {spec: k for k, spec in enumerate(spec for ids, _ in parts for spec in ids)}
    return [where[i] for i in range(n)]


def in_spec_order(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """The finished groups' batch-first tensors, as one tensor in spec order."""
    return torch.cat([t for _, t in parts])[_spec_order(parts, n)]
