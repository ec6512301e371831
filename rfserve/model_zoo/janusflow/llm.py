"""Run the HF Llama layers against caller-owned, preallocated KV buffers.

transformers' caches grow by appending; both JanusFlow paths need something else:
- text-to-image writes the prompt KV once and then *overwrites* the same 1 + G columns at
  every ODE step, so the prompt is never recomputed and nothing is reallocated (Janus-Pro's
  image tokens write one column a step); its batches share one `KVPool`;
- chat pages its KV (`model_zoo.paged_kv`): one pool of PAGE-token blocks per layer, a block table per
  sequence; every new token (a prompt chunk's or a decode step's) is written at its own (block, offset)
  (`PagedWrite`), so sequences of any lengths share one forward.

The layer maths is the HF LlamaDecoderLayer's, using its own submodules (norms, projections,
rotary embedding, MLP); only the cache write and the mask are ours. Tests compare it with
the plain HF forward and with `generate()`. Chat attends in three shapes:
- `CausalPrompt`: prompt chunks that start at position 0 see themselves causally, through
  `kernels.attention` on the keys and values just computed (right-padded rows: a real query never sees a pad);
- `PagedPrefix`: chunks that continue a sequence see its earlier KV, gathered from its blocks, and themselves
  (SDPA with an explicit mask: key column j is visible to the query at position p when j ≤ p);
- `PagedDecode`: one query per sequence through `kernels.decode_attention` over its block table, which
  reads only the blocks up to its length (the Triton kernel) or gathers the table's width (the torch twin).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rfserve import kernels
from rfserve.kernels.decode import gather_blocks
from rfserve.model_zoo.paged_kv import PagedKV, head_dim


class LlamaBody:
    """A bare LlamaModel (as Janus holds its language model) seen as `run_layers` reads a LlamaForCausalLM:
    its body under `.model`, and its `.config`."""

    def __init__(self, body):
        self.model, self.config = body, body.config


@dataclass
class KVBuffers:
    """Per layer, keys and values (B, kv_heads, S, head_dim)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, lm: LlamaForCausalLM, batch: int, length: int, *, device, dtype) -> "KVBuffers":
        shape, n = (batch, *_kv_shape(lm, length)), lm.config.num_hidden_layers
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)])

    def rows(self, stop: int, start: int = 0) -> "KVBuffers":
        """A view of rows [start, stop): writes through it land in these buffers."""
        return KVBuffers([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values])


def _kv_shape(lm: LlamaForCausalLM, length: int) -> tuple[int, int, int]:
    """(kv_heads, length, head_dim): one row of one layer's keys or values."""
    c = lm.config
    return c.num_key_value_heads or c.num_attention_heads, length, head_dim(c)


# The longest prefix (template and prompt) a text-to-image batch holds KV for: its KV is 2·rows × (prefix + the
# image tokens), so a prompt allowed the whole context (16,384 tokens on Janus-Pro) would make one batch of 8
# hold 16× what `rfserve plan` counts (issue #32). Both pipelines cut longer prompts to it, as SD cuts at 77.
T2I_PREFIX_TOKENS = 512


class KVPool:
    """The KV memory every text-to-image batch of one pipeline lives in: per layer, one flat buffer for keys
    and one for values, of which each batch takes the leading (rows, kv_heads, length, d) as a contiguous view.

    Why not a fresh `KVBuffers` per batch: the compiled step writes its keys and values into the cache in
    place, and CUDA graphs capture a graph that writes an input only when that input is static, at an address
    fixed from one replay to the next (inductor otherwise skips CUDA graphs for it: "mutated inputs"). Every
    view starts at its buffer's first element, so a bucket's graph always sees the same addresses, and the
    views are marked static. A view is contiguous, so its strides depend on its own shape alone, never on how
    large the pool has grown: the compiled graphs' stride guards hold. The server reserves the pool at load for
    the largest batch it will run (`reserve`: `--max-batch` prompts of the longest prefix, `T2I_PREFIX_TOKENS`),
    so that its memory is held from the start, where the chat KV budget measures it, and no batch grows it
    later; a pool used without a reservation grows to the largest batch asked for and keeps that memory, as a
    serving KV cache does, and after a growth each captured graph re-records once. One batch at a time uses it:
    the worker runs a pipeline's batches one after another.
    """

    def __init__(self, lm: LlamaForCausalLM, device: torch.device, dtype: torch.dtype):
        self.lm, self.device, self.dtype = lm, device, dtype
        self.flat: list[torch.Tensor] = []         # keys of every layer, then values

    def batch(self, rows: int, length: int) -> KVBuffers:
        """Zeroed buffers for a batch of `rows` sequences of up to `length` columns. Zeroed, so that a masked
        column holds no NaN left by an earlier batch: attention weighs it 0, and 0 × NaN would still be NaN."""
        kv = self._views(rows, length)
        for t in (*kv.keys, *kv.values):
            t.zero_()
        return kv

    def reserve(self, rows: int, length: int) -> None:
        """Hold the memory of a batch of `rows` sequences of `length` columns from now on."""
        self._views(rows, length)

    def lay_out(self, kv: KVBuffers | None, kept: list[int], rows: int, length: int,
                columns: int | None = None) -> KVBuffers:
        """A batch of `rows` sequences of `length` columns at the front of the pool whose first rows are the rows
        `kept` of `kv` (this pool's running batch), in that order, with their leading `columns` (default: all they
        have, up to `length`); the rest zeroed. A running batch whose rows left, joined, or now need another
        width."""
        take = length if columns is None else min(length, columns)
        moved = [t[kept, :, :take] for t in (*kv.keys, *kv.values)] if kept and kv is not None else []    # copies
        out = self.batch(rows, length)                                # first: the new views overlap them (zeroed)
        for dst, src in zip((*out.keys, *out.values), moved):
            dst[:len(kept), :, :src.shape[2]] = src
        return out

    def _views(self, rows: int, length: int) -> KVBuffers:
        shape = (rows, *_kv_shape(self.lm, length))
        size, n = math.prod(shape), self.lm.config.num_hidden_layers
        if not self.flat or self.flat[0].numel() < size:
            self.flat = []                                           # the old memory goes before the new comes
            self.flat = [torch.zeros(size, device=self.device, dtype=self.dtype) for _ in range(2 * n)]
        views = [f[:size].view(shape) for f in self.flat]            # (rows, kv_heads, length, d), contiguous
        for v in views:
            torch._dynamo.mark_static_address(v)
        return KVBuffers(views[:n], views[n:])


@dataclass(frozen=True)
class CausalPrompt:
    """Attention for prompts that start at position 0: each query sees this forward's keys up to its own."""


@dataclass(frozen=True)
class PagedPrefix:
    """Attention for prompt chunks that continue sequences: query t of row b, at `positions[b, t]`, sees the
    key columns 0 … positions[b, t] of the blocks `table[b]` (already holding this chunk's keys)."""
    table: torch.Tensor             # (B, W) int32: each row's blocks, padded with the null block
    positions: torch.Tensor         # (B, T)


@dataclass(frozen=True)
class PagedDecode:
    """Attention for one query per row over the first `lengths[b]` positions of the blocks `table[b]`."""
    table: torch.Tensor             # (B, W) int32
    lengths: torch.Tensor           # (B,) int32; 0 for a padding row (its output is zeros)


@dataclass(frozen=True)
class PagedWrite:
    """Where the B·T new tokens go in a paged cache, row-major over (B, T): token i at offset offsets[i] of
    block blocks[i]. A padding token goes to the null block."""
    blocks: torch.Tensor            # (B·T,) long
    offsets: torch.Tensor           # (B·T,) long


Attend = torch.Tensor | CausalPrompt | PagedPrefix | PagedDecode


def run_layers(lm: LlamaForCausalLM, embeds: torch.Tensor, positions: torch.Tensor, kv: KVBuffers | PagedKV,
               write: int | torch.Tensor | PagedWrite, mask: Attend) -> torch.Tensor:
    """The LLM body over `embeds` (B, T, D) at RoPE `positions` (B, T); returns the final-norm
    hidden states (B, T, D).

    `write` says where the T new keys/values go: into `KVBuffers`, an int `s` writes columns [s, s+T) of every
    row and a (B,) tensor writes column write[b] of row b (T must be 1); into a `PagedKV`, a `PagedWrite`.
    `mask` (B, 1, T, W) is True where a query may attend to a key column; W ≤ S is how many
    leading columns attention reads. `CausalPrompt`, `PagedPrefix` and `PagedDecode` are chat's shapes of
    attention (see the module docstring).
    """
    model = lm.model
    rows = None if isinstance(write, (int, PagedWrite)) else torch.arange(embeds.shape[0], device=embeds.device)
    cos, sin = model.rotary_emb(embeds, positions)
    h = embeds
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)                 # (B, H, T, d)
        k = attn.k_proj(x).view(shape).transpose(1, 2)                 # (B, Hkv, T, d)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = kv.keys[i], kv.values[i]
        if isinstance(write, PagedWrite):
            B, kv_heads, T, d = k.shape
            keys[write.blocks, :, write.offsets] = k.transpose(1, 2).reshape(B * T, kv_heads, d)
            values[write.blocks, :, write.offsets] = v.transpose(1, 2).reshape(B * T, kv_heads, d)
        elif isinstance(write, int):
            keys[:, :, write:write + k.shape[2]] = k
            values[:, :, write:write + v.shape[2]] = v
        else:
            keys[rows, :, write] = k[:, :, 0]
            values[rows, :, write] = v[:, :, 0]
        out = _attend(q, k, v, keys, values, mask, attn.scaling)                            # (B, H, T, d)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))   # (B, T, H·d) → D
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: Attend, scale: float) -> torch.Tensor:
    """q (B, H, T, d) → (B, H, T, d): against this forward's own k, v (B, Hkv, T, d) for `CausalPrompt`, else
    against the cache `keys`/`values` (rows (B, Hkv, S, d), or blocks (num_blocks, Hkv, PAGE, d) when paged)."""
    groups = q.shape[1] // k.shape[1]
    if isinstance(mask, CausalPrompt):
        k, v = (c.repeat_interleave(groups, dim=1) for c in (k, v))                    # (B, H, T, d)
        return kernels.attention(q, k, v, causal=True, scale=scale)
    if isinstance(mask, PagedDecode):
        return kernels.decode_attention(q[:, :, 0], keys, values, mask.table, mask.lengths, scale=scale)[:, :, None]
    if isinstance(mask, PagedPrefix):
        width = mask.table.shape[1] * keys.shape[2]                                   # W·PAGE columns
        seen = torch.arange(width, device=q.device) <= mask.positions[:, None, :, None]  # (B, 1, T, W·PAGE)
        return F.scaled_dot_product_attention(q, gather_blocks(keys, mask.table), gather_blocks(values, mask.table),
                                              attn_mask=seen, scale=scale, enable_gqa=groups != 1)
    w = mask.shape[-1]
    return F.scaled_dot_product_attention(q, keys[:, :, :w], values[:, :, :w], attn_mask=mask, scale=scale,
                                          enable_gqa=groups != 1)
