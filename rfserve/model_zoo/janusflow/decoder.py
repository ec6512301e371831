"""Token-level decoding over a paged KV cache, for continuous batching.

The cache is a pool of PAGE-token blocks per layer (`model_zoo.paged_kv`), allocated once; `blocks`, its
allocator, is the batcher's to use. A sequence owns a list of blocks, its token at position p lives at offset
p % PAGE of block blocks[p // PAGE], and nothing ever moves: a sequence that ends gives its blocks back.
Memory follows the tokens actually held, not slots × max_len.

- `prefill(chunks)`: several sequences' prompt chunks in ONE forward, right-padded to the longest chunk (the
  batcher bounds rows × longest chunk, so padding never costs more than the chunk budget; packing would need a
  varlen attention kernel that `kernels.attention` does not have). Chunks that all start at 0 attend causally
  through `kernels.attention`; a batch with a continuation chunk attends through the blocks (`PagedPrefix`).
- `decode(tokens, lengths, tables)`: one step for n sequences. The step writes each new token's key and value
  into its block and calls `kernels.decode_attention` over the block tables: the Triton kernel reads only each
  sequence's live tiles, the torch twin gathers the table's width. Eagerly the width is the blocks of the
  longest sequence, so a step costs the live tokens.

The fast path (`fast_path`) captures `step` once per (row bucket, width bucket), as vLLM captures its decode
graphs: the shapes are the bucket's alone, and `decode` pads up to it. Padding rows take token 0 at position 0
with a table of null blocks: they write into the null block and attend to nothing (length 0, zeros). On CUDA
there is one width, the whole context, since the Triton kernel skips the dead tiles of a wide table and the
captures stay one per row bucket; elsewhere (the torch twin, whose cost is the width it gathers) the widths are
powers of two of blocks from 256 tokens up to `max_len`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from rfserve.model_zoo.fast_path import Captured, CompiledCalls
from rfserve.model_zoo.janusflow.llm import CausalPrompt, PagedDecode, PagedPrefix, PagedWrite, run_layers
from rfserve.model_zoo.janusflow.loading import JanusFlowParts
from rfserve.model_zoo.paged_kv import (NULL_BLOCK, PAGE, BlockAllocator, PagedKV, PromptChunk, blocks_for,
                                        head_dim, llm_bytes_per_token)

# A prompt's ids (L,), its images' pixels (or None) and the positions their features overwrite → (L, D).
EmbedPrompt = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
SMALLEST_WIDTH = 256        # tokens: the narrowest table a torch-twin decode step is captured at


def default_blocks(slots: int, max_len: int) -> int:
    """A pool where every slot can hold `max_len` tokens at once (the slot cache's memory), plus the null block."""
    return slots * blocks_for(max_len) + 1


@dataclass(frozen=True)
class JanusFlowChat:
    """JanusFlow's `ChatParts` (model_zoo.base): the processor, and the paged decoder chat batches over."""
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

    @property
    def kv_bytes_per_token(self) -> int:
        return llm_bytes_per_token(self.parts.model.language_model.config, self.parts.dtype)

    def decoder(self, slots: int, max_len: int, num_blocks: int | None = None) -> "PagedDecoder":
        p, lm = self.parts, self.parts.model.language_model
        return PagedDecoder(lm, lm.lm_head, p.model.embed_prompt, p.device, p.dtype, slots, max_len, num_blocks)


class PagedDecoder:
    """Over any Llama body `lm` (read as `run_layers` reads it), its text head and the model's prompt embedding.

    `slots`: the most sequences one decode step runs; `max_len`: the most positions one sequence holds;
    `num_blocks`: the pool's size, the null block included (default: `default_blocks`).
    """
    page = PAGE

    def __init__(self, lm, head: nn.Module, embed_prompt: EmbedPrompt, device: torch.device, dtype: torch.dtype,
                 slots: int, max_len: int, num_blocks: int | None = None):
        self.lm, self.head, self.embed_prompt = lm, head, embed_prompt
        self.device, self.dtype, self.slots, self.max_len = device, dtype, slots, max_len
        c = lm.config
        self.num_blocks = num_blocks or default_blocks(slots, max_len)
        self.kv = PagedKV.allocate(c.num_hidden_layers, c.num_key_value_heads, head_dim(c), self.num_blocks,
                                   device=device, dtype=dtype)
        self.blocks = BlockAllocator(self.num_blocks)
        self.row_buckets: tuple[int, ...] = ()
        self.width_buckets: tuple[int, ...] = ()
        self.step = self.paged_step             # the hot call, which the fast path swaps for a compiled one

    # -- the fast path ---------------------------------------------------------------
    def fast_path(self, buckets: tuple[int, ...]) -> CompiledCalls:
        """`step` compiled per (rows, width): rows the buckets up to `slots`, and `slots` itself; widths (in
        blocks) as the module docstring says."""
        self.row_buckets = tuple(sorted({b for b in buckets if b < self.slots} | {self.slots}))
        top = blocks_for(self.max_len)
        widths, w = [], blocks_for(SMALLEST_WIDTH)
        while self.device.type != "cuda" and w < top:
            widths.append(w)
            w *= 2
        self.width_buckets = (*widths, top)
        return CompiledCalls([(self, "step")])

    @torch.inference_mode()
    def capture(self) -> None:
        """Run `step` at every (rows, width) bucket, twice (compile, then record). Every row is a padding row,
        which writes only into the null block, so capture may run beside live sequences."""
        for b in self.row_buckets:
            for w in self.width_buckets:
                for _ in range(2):
                    tokens, positions = (torch.zeros(b, dtype=torch.long, device=self.device) for _ in range(2))
                    self.step(tokens, positions, torch.zeros(b, w, dtype=torch.int32, device=self.device))

    # -- prompts ---------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, ids: list[int], pixel_values: torch.Tensor | None, image_positions: list[int]) -> torch.Tensor:
        """Prompt embeddings (L, D) with image features in place."""
        return self.embed_many([(ids, pixel_values, image_positions)])[0]

    @torch.inference_mode()
    def embed_many(self, prompts: list[tuple[list[int], torch.Tensor | None, list[int]]]) -> list[torch.Tensor]:
        """Several prompts' embeddings, their images encoded in one vision forward: the prompts are embedded as
        one concatenated prompt (each one's image positions shifted by the lengths before it), then split."""
        ids, pixels, positions, offset = [], [], [], 0
        for p_ids, p_pixels, p_positions in prompts:
            ids += p_ids
            positions += [offset + i for i in p_positions]
            if p_pixels is not None:
                pixels.append(p_pixels.to(self.device, self.dtype))
            offset += len(p_ids)
        embeds = self.embed_prompt(torch.tensor(ids, device=self.device), torch.cat(pixels) if pixels else None,
                                   torch.tensor(positions, dtype=torch.long, device=self.device))   # (ΣL, D)
        return list(embeds.split([len(p[0]) for p in prompts]))

    @torch.inference_mode()
    def prefill(self, chunks: list[PromptChunk]) -> torch.Tensor:
        """Write each chunk's KV into its sequence's blocks, in one forward; the logits (n, V) in fp32 of each
        chunk's last token."""
        n, dev = len(chunks), self.device
        lengths = [c.embeds.shape[0] for c in chunks]
        T, W = max(lengths), max(blocks_for(c.start + t) for c, t in zip(chunks, lengths))
        for c, t in zip(chunks, lengths):
            if len(c.blocks) < blocks_for(c.start + t) or c.start + t > self.max_len:
                raise ValueError(f"a chunk of {t} tokens from position {c.start} does not fit its "
                                 f"{len(c.blocks)} blocks (max_len {self.max_len})")
        table_t = self._table([c.blocks[:blocks_for(c.start + t)] for c, t in zip(chunks, lengths)], n, W)
        embeds = torch.zeros(n, T, chunks[0].embeds.shape[-1], device=dev, dtype=chunks[0].embeds.dtype)
        for i, c in enumerate(chunks):
            embeds[i, :lengths[i]] = c.embeds                                         # right-padded (n, T, D)
        starts, lens = (torch.tensor(x, device=dev) for x in ([c.start for c in chunks], lengths))
        positions = starts[:, None] + torch.arange(T, device=dev)                   # (n, T)
        real = torch.arange(T, device=dev) < lens[:, None]                            # (n, T)
        blocks = table_t.long().gather(1, (positions // PAGE).clamp(max=W - 1))
        write = PagedWrite(torch.where(real, blocks, NULL_BLOCK).flatten(),
                           torch.where(real, positions % PAGE, 0).flatten())
        mask = CausalPrompt() if all(c.start == 0 for c in chunks) else PagedPrefix(table_t, positions)
        h = run_layers(self.lm, embeds, positions, self.kv, write=write, mask=mask)   # (n, T, D)
        return self.head(h[torch.arange(n, device=dev), lens - 1]).float()           # (n, V)

    # -- decoding --------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One step for n sequences: token i sits at position lengths[i], in the blocks tables[i] (which must
        cover it); returns logits (n, V) fp32."""
        n, dev = len(tokens), self.device
        width = blocks_for(max(lengths) + 1)
        rows = width_ = None
        if isinstance(self.step, Captured):
            rows = next((b for b in self.row_buckets if b >= n), None)
            width_ = next((w for w in self.width_buckets if w >= width), None)
        if rows is None or width_ is None:
            rows, width_ = n, width                          # eager: exactly the rows and the live width
        pad = [0] * (rows - n)
        return self.step(torch.tensor(tokens + pad, device=dev), torch.tensor(lengths + pad, device=dev),
                         self._table([blocks[:width_] for blocks in tables], rows, width_))[:n]

    def _table(self, tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
        """Block lists (each at most `width` long) as a (rows, width) int32 table on the device, padded with the
        null block: a row past the lists is a padding row, a list's tail is unused."""
        table = np.full((rows, width), NULL_BLOCK, dtype=np.int32)
        for i, blocks in enumerate(tables):
            table[i, :len(blocks)] = blocks
        return torch.from_numpy(table).to(self.device)

    def paged_step(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`decode`'s step: `tokens`, `positions` (b,), `table` (b, W) int32 → logits (b, V). A row whose first
        block is the null block is padding: length 0. Called under `decode`'s or `capture`'s inference mode,
        which stays outside the compiled graph."""
        embeds = self.lm.model.embed_tokens(tokens)[:, None]                          # (b, 1, D)
        blocks = table.gather(1, (positions // PAGE)[:, None])[:, 0].long()          # (b,)
        lengths = torch.where(table[:, 0] == NULL_BLOCK, 0, positions + 1).to(torch.int32)
        h = run_layers(self.lm, embeds, positions[:, None], self.kv, write=PagedWrite(blocks, positions % PAGE),
                       mask=PagedDecode(table, lengths))
        return self.head(h[:, 0]).float()                                              # (b, V)

