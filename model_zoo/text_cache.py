"""A bounded LRU of text-encoder outputs per prompt string.

Negative prompts are nearly always the preset's default (or ""), and clients repeat
prompts, so each distinct string is encoded once; misses in a batch are encoded together.
"""
from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import Callable

import torch

Encoder = Callable[[list[str]], tuple[torch.Tensor, list[bool]]]


class TextEncoderCache:
    def __init__(self, encode: Encoder, capacity: int = 256):
        self._encode = encode
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, bool]] = OrderedDict()
        self._lock = Lock()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, L, D) embeddings in prompt order, and per-prompt truncation flags."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if missing:
            emb, truncated = self._encode(missing)
            with self._lock:
                for i, prompt in enumerate(missing):
                    self._entries[prompt] = (emb[i : i + 1], truncated[i])   # (1, L, D)
                    self._entries.move_to_end(prompt)
        with self._lock:
            rows = [self._entries[p] for p in prompts]
            for p in prompts:
                self._entries.move_to_end(p)
            while len(self._entries) > max(self._capacity, len(prompts)):
                self._entries.popitem(last=False)
        return torch.cat([r[0] for r in rows]), [r[1] for r in rows]
