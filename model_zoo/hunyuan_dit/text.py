"""Text conditioning for Hunyuan-DiT and a bounded cache of it per prompt string.

Each prompt yields four tensors (BERT and mT5 states, each with its mask), so the shared
single-tensor `TextEncoderCache` does not fit; this is the same LRU over `TextEmbeddings` rows.
The empty negative prompt, used by nearly every CFG request, is encoded once.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from threading import Lock
from typing import Callable

import torch


@dataclass
class TextEmbeddings:
    bert: torch.Tensor         # (B, 77, D_bert)
    bert_mask: torch.Tensor    # (B, 77) 1 = token, 0 = padding
    t5: torch.Tensor           # (B, 256, D_t5)
    t5_mask: torch.Tensor      # (B, 256)

    def row(self, i: int) -> "TextEmbeddings":
        return TextEmbeddings(*(getattr(self, f.name)[i : i + 1] for f in fields(self)))

    @staticmethod
    def cat(items: list["TextEmbeddings"]) -> "TextEmbeddings":
        return TextEmbeddings(*(torch.cat([getattr(e, f.name) for e in items]) for f in fields(TextEmbeddings)))

    def transformer_kwargs(self) -> dict:
        """The names HunyuanDiT2DModel.forward takes."""
        return dict(encoder_hidden_states=self.bert, text_embedding_mask=self.bert_mask,
                    encoder_hidden_states_t5=self.t5, text_embedding_mask_t5=self.t5_mask)


Encoder = Callable[[list[str]], tuple[TextEmbeddings, list[bool]]]


class TextCache:
    """LRU of per-prompt rows. Capacity is small because a real entry is about 1.2 MB in bf16."""

    def __init__(self, encode: Encoder, capacity: int = 64):
        self._encode = encode
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[TextEmbeddings, bool]] = OrderedDict()
        self._lock = Lock()

    def encode(self, prompts: list[str]) -> tuple[TextEmbeddings, list[bool]]:
        """Embeddings in prompt order and per-prompt truncation flags; misses encoded together."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        if missing:
            emb, truncated = self._encode(missing)
            with self._lock:
                for i, prompt in enumerate(missing):
                    self._entries[prompt] = (emb.row(i), truncated[i])
        with self._lock:
            rows = [self._entries[p] for p in prompts]
            for p in prompts:
                self._entries.move_to_end(p)
            while len(self._entries) > max(self._capacity, len(prompts)):
                self._entries.popitem(last=False)
        return TextEmbeddings.cat([r[0] for r in rows]), [r[1] for r in rows]
