"""A paged KV cache: one pool of fixed-size blocks per layer, and the host-side allocator that hands them out.

Memory: per layer, keys and values of shape (num_blocks, kv_heads, PAGE, head_dim), allocated once. A sequence
owns a list of blocks (its block table); its token at position p lives in block table[p // PAGE] at offset
p % PAGE. Blocks need not be contiguous or in order, so a sequence grows one block at a time, to any length the
pool can hold, and a finished one gives its blocks back without moving anyone else's KV (no compaction).

Block 0 is the null block, never handed out: the padding rows of a captured decode bucket point their whole
table at it and write their (discarded) token into it, and a table's unused tail is 0. Attention never reads
it for a real sequence, since a sequence's live positions all lie in its own blocks.

The buffers are inference tensors with static addresses (`torch._dynamo.mark_static_address`): the compiled
decode step writes into them in place, which CUDA graphs capture only for a static input. The allocator is
plain Python: only the batcher's thread calls it, between forwards, so it needs no lock and no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE = 16                  # tokens per block (the planner's `memory_plan.PAGE` is the same figure)
NULL_BLOCK = 0


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // PAGE)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes one token takes across the model: a key and a value per layer."""
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def head_dim(config) -> int:
    """A Llama config's head width (`head_dim` where the config sets it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llm_bytes_per_token(config, dtype: torch.dtype) -> int:
    """`bytes_per_token` of the Llama LLM a config describes: what the planner counts and the decoder allocates."""
    return bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim(config), dtype)


@dataclass
class PagedKV:
    """Per layer, keys and values (num_blocks, kv_heads, PAGE, head_dim)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, layers: int, kv_heads: int, head_dim: int, num_blocks: int, *, device: torch.device,
                 dtype: torch.dtype) -> "PagedKV":
        """Zeroed buffers (a block never written holds zeros, never NaN), as inference tensors at static addresses."""
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs the null block and at least one more, got {num_blocks}")
        shape = (num_blocks, kv_heads, PAGE, head_dim)
        with torch.inference_mode():
            out = cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
                      [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)])
        for buffer in (*out.keys, *out.values):
            torch._dynamo.mark_static_address(buffer)
        return out

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]


class BlockAllocator:
    """The free list of a pool of `num_blocks` blocks, block 0 (the null block) excepted.

    Blocks come from the end of the list and go back to it, so a block just freed is the next handed out (its
    memory is likely still in the GPU's L2). A request for more blocks than are free gets None and takes nothing.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))      # handed out from the end: 1, 2, 3, ...

    @property
    def capacity(self) -> int:
        """Blocks a sequence could ever hold: all but the null block."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n <= 0:
            return []
        taken = self._free[-n:][::-1]
        del self._free[-n:]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass(frozen=True)
class PromptChunk:
    """Part of one sequence's prompt to prefill: its embeddings, the position of its first token, and the
    sequence's blocks (covering at least `start` + T positions)."""
    embeds: torch.Tensor            # (T, D)
    start: int
    blocks: list[int]
