"""Text conditioning for Hunyuan-DiT: four tensors per prompt (BERT and mT5 states, each
with its mask), with the row/cat pair the shared `TextEncoderCache` needs to cache them per prompt,
and the take/join of a running batch's rows (`model_zoo.running.RowState`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rfserve.model_zoo.samplers import with_uncond


@dataclass
class TextEmbeddings:
    bert: torch.Tensor         # (B, 77, D_bert)
    bert_mask: torch.Tensor    # (B, 77) 1 = token, 0 = padding
    t5: torch.Tensor           # (B, 256, D_t5)
    t5_mask: torch.Tensor      # (B, 256)

    def row(self, i: int) -> "TextEmbeddings":
        return self.take([i])

    @staticmethod
    def cat(items: list["TextEmbeddings"]) -> "TextEmbeddings":
        return TextEmbeddings(*(torch.cat([getattr(e, f.name) for e in items]) for f in fields(TextEmbeddings)))

    def take(self, rows: list[int]) -> "TextEmbeddings":
        return TextEmbeddings(*(getattr(self, f.name)[rows] for f in fields(self)))

    def join(self, other: "TextEmbeddings") -> "TextEmbeddings":
        return TextEmbeddings.cat([self, other])

    def with_uncond(self, cfg: list[int], uncond: "TextEmbeddings") -> "TextEmbeddings":
        """A forward's rows (`samplers.with_uncond`): `uncond`'s rows `cfg` (the negative prompts), then these."""
        return TextEmbeddings(*(with_uncond(getattr(self, f.name), cfg, getattr(uncond, f.name))
                                for f in fields(self)))

    def transformer_kwargs(self) -> dict:
        """The names HunyuanDiT2DModel.forward takes."""
        return dict(encoder_hidden_states=self.bert, text_embedding_mask=self.bert_mask,
                    encoder_hidden_states_t5=self.t5, text_embedding_mask_t5=self.t5_mask)
