"""Fault injection for tests and drills, off unless `--enable-fault-injection` is given.

A prompt carrying `__rfserve_fault__:KIND` makes the worker misbehave on purpose:
`error` raises, `oom` raises an out-of-memory error for any batch containing it,
`oom-batch` only when it shares a batch with other images (so splitting rescues it),
`hang=S` blocks the worker for S seconds (to trip the watchdog).
"""
from __future__ import annotations

import re
import time

import torch

from model_zoo.base import ImageSpec

MARKER = "__rfserve_fault__"
_PATTERN = re.compile(MARKER + r":([a-z-]+)(?:=([0-9.]+))?")


def inject(specs: list[ImageSpec]) -> None:
    for spec in specs:
        match = _PATTERN.search(spec.prompt)
        if not match:
            continue
        kind, arg = match.groups()
        if kind == "error":
            raise RuntimeError("injected fault")
        if kind == "oom" or (kind == "oom-batch" and len(specs) > 1):
            raise torch.OutOfMemoryError("injected out-of-memory")
        if kind == "hang":
            time.sleep(float(arg or 3600))
