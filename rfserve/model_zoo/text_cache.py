"""A bounded LRU of text-encoder outputs per prompt string.

Negative prompts are nearly always the preset's default (or ""), and clients repeat
prompts, so each distinct string is encoded once; misses in a batch are encoded together.
An encoding is a tensor batch by default; families whose encoders return several tensors
per prompt pass their own `row` (take one prompt) and `cat` (stack prompts back).
"""
from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import Callable, Generic, TypeVar

import torch

E = TypeVar("E")


def _row(emb: torch.Tensor, i: int) -> torch.Tensor:
    return emb[i : i + 1]                                     # (1, L, D)


class TextEncoderCache(Generic[E]):
    def __init__(self, encode: Callable[[list[str]], tuple[E, list[bool]]], capacity: int = 256,
                 row: Callable[[E, int], E] = _row, cat: Callable[[list[E]], E] = torch.cat):
        self._encode, self._row, self._cat = encode, row, cat
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[E, bool]] = OrderedDict()
        self._lock = Lock()

    def encode(self, prompts: list[str]) -> tuple[E, list[bool]]:
        """Embeddings in prompt order, and per-prompt truncation flags."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if missing:
            emb, truncated = self._encode(missing)
            with self._lock:
                for i, prompt in enumerate(missing):
                    self._entries[prompt] = (self._row(emb, i), truncated[i])
                    self._entries.move_to_end(prompt)
        with self._lock:
            rows = [self._entries[p] for p in prompts]
            for p in prompts:
                self._entries.move_to_end(p)
            while len(self._entries) > max(self._capacity, len(prompts)):
                self._entries.popitem(last=False)
        return self._cat([r[0] for r in rows]), [r[1] for r in rows]
