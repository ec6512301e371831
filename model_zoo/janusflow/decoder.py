"""Token-level decoding over a fixed pool of KV slots, for continuous batching.

The cache is allocated once: (slots, kv_heads, max_len, head_dim) per layer. Running sequences
occupy rows 0..n−1, so a decode step attends over plain views of the first n rows; when a
sequence leaves, the last one moves into its row (one copy of its KV, never a reallocation).
A sequence's KV column j holds its token at position j, so positions are simply lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model_zoo.janusflow.llm import KVBuffers, run_layers
from model_zoo.janusflow.loading import JanusFlowParts


@dataclass(frozen=True)
class JanusFlowChat:
    """JanusFlow's `ChatParts` (model_zoo.base): the processor, and the slot decoder chat batches over."""
    parts: JanusFlowParts

    @property
    def processor(self):
        return self.parts.processor

    @property
    def tokenizer(self):
        return self.parts.tokenizer

    @property
    def context_length(self) -> int:
        return self.parts.context_length

    def decoder(self, slots: int, max_len: int) -> "SlotDecoder":
        return SlotDecoder(self.parts, slots, max_len)


class SlotDecoder:
    def __init__(self, parts: JanusFlowParts, slots: int, max_len: int):
        self.parts, self.slots, self.max_len = parts, slots, max_len
        self.lm = parts.model.language_model
        self.kv = KVBuffers.allocate(self.lm, slots, max_len, device=parts.device, dtype=parts.dtype)

    @torch.inference_mode()
    def embed(self, ids: list[int], pixel_values: torch.Tensor | None, image_positions: list[int]) -> torch.Tensor:
        """Prompt embeddings (L, D) with image features in place."""
        p = self.parts
        ids_t = torch.tensor(ids, device=p.device)
        pixels = None if pixel_values is None else pixel_values.to(p.device, p.dtype)
        return p.model.embed_prompt(ids_t, pixels, torch.tensor(image_positions, dtype=torch.long, device=p.device))

    @torch.inference_mode()
    def prefill(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Write a prompt (L, D) into slot `row`; returns the next-token logits (V,) in fp32."""
        L = embeds.shape[0]
        dev = embeds.device
        mask = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None, None]      # (1, 1, L, L)
        positions = torch.arange(L, device=dev)[None]
        h = run_layers(self.lm, embeds[None], positions, self.kv.rows(row + 1, row), write=0, mask=mask)
        return self.lm.lm_head(h[0, -1]).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One step for rows 0..n−1: token i sits at position lengths[i]; returns logits (n, V) fp32."""
        n, dev = len(tokens), self.parts.device
        width = max(lengths) + 1
        pos = torch.tensor(lengths, device=dev)                                       # (n,)
        embeds = self.lm.get_input_embeddings()(torch.tensor(tokens, device=dev))[:, None]   # (n, 1, D)
        mask = (torch.arange(width, device=dev)[None, :] <= pos[:, None])[:, None, None]     # (n, 1, 1, W)
        h = run_layers(self.lm, embeds, pos[:, None], self.kv.rows(n), write=pos, mask=mask)
        return self.lm.lm_head(h[:, 0]).float()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's KV from row src to row dst (compaction when a row is freed)."""
        for buf in (*self.kv.keys, *self.kv.values):
            buf[dst, :, :length] = buf[src, :, :length]
