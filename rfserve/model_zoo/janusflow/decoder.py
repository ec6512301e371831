"""Token-level decoding over a fixed pool of KV slots, for continuous batching.

The cache is allocated once: (slots, kv_heads, max_len, head_dim) per layer. Running sequences
occupy rows 0..n−1, so a decode step attends over plain views of the first n rows; when a
sequence leaves, the last one moves into its row (one copy of its KV, never a reallocation).
A sequence's KV column j holds its token at position j, so positions are simply lengths.

The fast path (`fast_path`) captures one decode step per bucket of running rows, as gpt-fast and vLLM
capture theirs: `step` attends over the whole cache width with a mask, so its shapes depend on the bucket
alone, and `decode` pads the rows up to the bucket (the padding rows are free slots, whose column 0 it
overwrites harmlessly). Eagerly, `decode` reads only the columns in use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rfserve.model_zoo.fast_path import Captured, CompiledCalls
from rfserve.model_zoo.janusflow.llm import CausalPrompt, KVBuffers, LiveColumns, run_layers
from rfserve.model_zoo.janusflow.loading import JanusFlowParts

# A prompt's ids (L,), its images' pixels (or None) and the positions their features overwrite → (L, D).
EmbedPrompt = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


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
        p, lm = self.parts, self.parts.model.language_model
        return SlotDecoder(lm, lm.lm_head, p.model.embed_prompt, p.device, p.dtype, slots, max_len)


class SlotDecoder:
    """Over any Llama body `lm` (read as `run_layers` reads it), its text head and the model's prompt embedding."""

    def __init__(self, lm, head: nn.Module, embed_prompt: EmbedPrompt, device: torch.device, dtype: torch.dtype,
                 slots: int, max_len: int):
        self.lm, self.head, self.embed_prompt = lm, head, embed_prompt
        self.device, self.dtype, self.slots, self.max_len = device, dtype, slots, max_len
        with torch.inference_mode():        # inference tensors, as everything that writes into them runs so
            self.kv = KVBuffers.allocate(lm, slots, max_len, device=device, dtype=dtype)
        self.buckets: tuple[int, ...] = ()
        self.step = self.full_width_step         # the hot call, which the fast path swaps for a compiled one

    def fast_path(self, buckets: tuple[int, ...]) -> CompiledCalls:
        """`step` compiled per bucket of running rows (the buckets up to `slots`, and `slots` itself)."""
        self.buckets = tuple(sorted({b for b in buckets if b < self.slots} | {self.slots}))
        for buffer in (*self.kv.keys, *self.kv.values):
            torch._dynamo.mark_static_address(buffer)       # CUDA graphs write the cache in place, never a copy
        return CompiledCalls([(self, "step")])

    @torch.inference_mode()
    def capture(self) -> None:
        """Run `step` at every bucket, twice (compile, then record): while nothing is running, so the
        columns it writes are free."""
        for b in self.buckets:
            for _ in range(2):
                tokens, positions = (torch.zeros(b, dtype=torch.long, device=self.device) for _ in range(2))
                self.step(tokens, positions)                   # two tensors: decode never passes one twice

    @torch.inference_mode()
    def embed(self, ids: list[int], pixel_values: torch.Tensor | None, image_positions: list[int]) -> torch.Tensor:
        """Prompt embeddings (L, D) with image features in place."""
        ids_t = torch.tensor(ids, device=self.device)
        pixels = None if pixel_values is None else pixel_values.to(self.device, self.dtype)
        return self.embed_prompt(ids_t, pixels, torch.tensor(image_positions, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def prefill(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Write a prompt (L, D) into slot `row`; returns the next-token logits (V,) in fp32."""
        positions = torch.arange(embeds.shape[0], device=embeds.device)[None]            # (1, L)
        h = run_layers(self.lm, embeds[None], positions, self.kv.rows(row + 1, row), write=0, mask=CausalPrompt())
        return self.head(h[0, -1]).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One step for rows 0..n−1: token i sits at position lengths[i]; returns logits (n, V) fp32."""
        n, dev = len(tokens), self.device
        bucket = next((b for b in self.buckets if b >= n), None) if isinstance(self.step, Captured) else None
        if bucket is not None:
            pad = [0] * (bucket - n)
            return self.step(torch.tensor(tokens + pad, device=dev), torch.tensor(lengths + pad, device=dev))[:n]
        return self._step(torch.tensor(tokens, device=dev), torch.tensor(lengths, device=dev), max(lengths) + 1)

    def full_width_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`decode`'s step for rows 0..b−1 (`tokens`, `positions`: (b,)) over every cache column: one shape per b
        (the decode kernel still reads only each row's live columns). Called under `decode`'s or `capture`'s
        inference mode, which stays outside the compiled graph."""
        return self._step(tokens, positions, self.max_len)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        embeds = self.lm.model.embed_tokens(tokens)[:, None]                          # (b, 1, D)
        live = LiveColumns((positions + 1).to(torch.int32), width)                   # a row sees up to its token
        h = run_layers(self.lm, embeds, positions[:, None], self.kv.rows(len(tokens)), write=positions, mask=live)
        return self.head(h[:, 0]).float()                                              # (b, V)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's KV from row src to row dst (compaction when a row is freed)."""
        for buf in (*self.kv.keys, *self.kv.values):
            buf[dst, :, :length] = buf[src, :, :length]
