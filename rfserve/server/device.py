"""The device the engine runs on (`resolve_device`), and turns on it: at most one forward runs at a time, and image
work and chat take turns.

Every forward the engine runs (an image batch, a chat prefill or decode step) holds a turn. Turns are
served first come, first served (a ticket lock), and an image batch gives its turn up between
denoising steps whenever someone is queued (`pause`, which the worker calls between steps). So while
chat sequences run, image steps and chat steps alternate: a stream's gap between tokens is about one
denoising step plus one decode step, never the length of an image batch. With nobody queued, `pause`
is one check under a lock, and image throughput is what it was.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


class DeviceTurns:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0                # the next ticket to hand out
        self._serving = 0             # the ticket that may run now

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    @contextmanager
    def turn(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @property
    def queued(self) -> int:
        """Turns waiting behind the one running."""
        with self._cond:
            return max(0, self._next - self._serving - 1)

    def pause(self) -> None:
        """Called by the holder between steps: everyone queued goes first, then the holder goes on."""
        if self.queued:
            self.release()
            self.acquire()
