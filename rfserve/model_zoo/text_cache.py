"""A bounded LRU of text-encoder outputs per prompt string.

Negative prompts are nearly always the preset's default (or ""), and clients repeat
prompts, so each distinct string is encoded once; misses in a batch are encoded together.
An encoding is a tensor batch by default; families whose encoders return several tensors
per prompt pass their own `row` (take one prompt) and `cat` (stack prompts back).

Where one prompt encodes differently under a text-encoder LoRA, the caller passes a `variant` (the adapters and
scales, hashable) and the `encoder` that binds them: entries are kept per (variant, prompt), plain prompts per
prompt string as before.
"""
from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import Callable, Generic, Hashable, TypeVar

import torch

E = TypeVar("E")


def _row(emb: torch.Tensor, i: int) -> torch.Tensor:
    return emb[i : i + 1]                                     # (1, L, D)


class TextEncoderCache(Generic[E]):
    def __init__(self, encode: Callable[[list[str]], tuple[E, list[bool]]], capacity: int = 256,
                 row: Callable[[E, int], E] = _row, cat: Callable[[list[E]], E] = torch.cat):
        self._encode, self._row, self._cat = encode, row, cat
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, tuple[E, bool]] = OrderedDict()
        self._lock = Lock()

    def encode(self, prompts: list[str], variant: Hashable = None,
               encoder: Callable[[list[str]], tuple[E, list[bool]]] | None = None) -> tuple[E, list[bool]]:
        """Embeddings in prompt order, and per-prompt truncation flags; with a `variant`, those its `encoder`
        gives (cached apart from the plain prompts')."""
        keys = prompts if variant is None else [(variant, p) for p in prompts]
        with self._lock:
            missing = list(dict.fromkeys((k, p) for k, p in zip(keys, prompts) if k not in self._entries))
        if missing:
            emb, truncated = (encoder or self._encode)([p for _, p in missing])
            with self._lock:
                for i, (key, _) in enumerate(missing):
                    self._entries[key] = (self._row(emb, i), truncated[i])
                    self._entries.move_to_end(key)
        with self._lock:
            rows = [self._entries[k] for k in keys]
            for k in keys:
                self._entries.move_to_end(k)
            while len(self._entries) > max(self._capacity, len(prompts)):
                self._entries.popitem(last=False)
        return self._cat([r[0] for r in rows]), [r[1] for r in rows]
