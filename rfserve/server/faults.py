"""Fault injection for tests and drills, off unless `--enable-fault-injection` is given.

A prompt carrying `__rfserve_fault__:KIND` makes the engine misbehave on purpose.
Images (the worker): `error` raises, `oom` raises an out-of-memory error for any batch containing it,
`oom-batch` only when it shares a batch with other images (so splitting rescues it), `hang=S` blocks
the worker for S seconds (to trip the watchdog).
Chat (the last user message; the continuous batcher): `oom` fails the sequence's prefill with an
out-of-memory error, `hang=S` makes every decode step that includes the sequence take S seconds more.
"""
from __future__ import annotations

import re
import time

import torch

from rfserve.model_zoo.base import ImageSpec

MARKER = "__rfserve_fault__"
_PATTERN = re.compile(MARKER + r":([a-z-]+)(?:=([0-9.]+))?")

Fault = tuple[str, float | None]          # (kind, argument)


def find(text: str) -> Fault | None:
    match = _PATTERN.search(text)
    if not match:
        return None
    kind, arg = match.groups()
    return kind, None if arg is None else float(arg)


def inject(specs: list[ImageSpec], batch: int | None = None) -> None:
    """`specs` begin, in a batch of `batch` rows (default: just them; joiners: with the rows already running)."""
    for spec in specs:
        fault = find(spec.prompt)
        if fault is None:
            continue
        kind, arg = fault
        if kind == "error":
            raise RuntimeError("injected fault")
        if kind == "oom" or (kind == "oom-batch" and (batch or len(specs)) > 1):
            raise torch.OutOfMemoryError("injected out-of-memory")
        if kind == "hang":
            time.sleep(arg or 3600)


def inject_chat(fault: Fault | None, phase: str) -> None:
    """`phase` is "prefill" or "decode"."""
    if fault is None:
        return
    kind, arg = fault
    if kind == "oom" and phase == "prefill":
        raise torch.OutOfMemoryError("injected out-of-memory")
    if kind == "hang" and phase == "decode":
        time.sleep(arg or 3600)
