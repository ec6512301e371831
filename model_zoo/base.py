"""What every image pipeline offers the server: a card describing its limits and
defaults, and `run()` over a batch of compatible image specs."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageDefaults:
    steps: int
    guidance: float
    negative_prompt: str = ""
    size: str = "512x512"


@dataclass(frozen=True)
class ModelCard:
    """Limits the gateway validates against before anything is queued."""
    name: str
    family: str
    defaults: ImageDefaults
    sizes: tuple[str, ...]
    max_steps: int = 100
    max_guidance: float = 30.0
    max_prompt_tokens: int = 77
    supports_negative_prompt: bool = True


@dataclass(frozen=True)
class ImageSpec:
    """One image to make. Specs in a batch share `batch_key()`."""
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    def batch_key(self) -> tuple:
        return (self.width, self.height, self.steps, self.uses_cfg)


@dataclass
class BatchOutput:
    images: np.ndarray                      # (B, H, W, 3) uint8
    prompt_truncated: list[bool]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


class StageTimer:
    """Wall-clock per stage; the device is synchronised at stage ends so GPU work
    is attributed to the stage that queued it."""

    def __init__(self, sync=None):
        self.timings: dict[str, float] = {}
        self._sync = sync or (lambda: None)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    w, h = size.lower().split("x")
    return int(w), int(h)
