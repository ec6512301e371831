"""Decode attention over a paged KV cache: the Triton split-K kernel or its SDPA twin, chosen by the dispatcher.

One query row per sequence, q (B, H, D), against the keys and values each sequence's block table points to;
the layout and how the chat decoder's slot cache maps onto it are in `triton_decode`'s docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rfserve.kernels import dispatch


def gather_blocks(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The blocks of `cache` (num_blocks, Hkv, PAGE, D) that each row of `table` (B, W) names, in order, as that
    row's contiguous keys or values: (B, Hkv, W·PAGE, D)."""
    B, W = table.shape
    _, kv_heads, page, D = cache.shape
    return cache[table.long()].transpose(1, 2).reshape(B, kv_heads, W * page, D)   # from (B, Hkv, W, PAGE, D)


def decode_attention_torch(q, k_cache, v_cache, block_table, lengths, *, scale=None):
    """The twin, with static shapes (torch.compile and CUDA graphs take it as it is): gather every sequence's
    blocks to (B, Hkv, max_blocks·PAGE, D), drop the columns at or past its length, and run SDPA.

    Table entries past a sequence's length are clamped into range and their keys and values zeroed, so a
    free block's stale or uninitialised contents (even NaN) never reach the output; the kernel never loads them.
    """
    H = q.shape[1]
    num_blocks, kv_heads, page, _ = k_cache.shape
    width = block_table.shape[1] * page
    table = block_table.long().clamp(0, num_blocks - 1)
    keep = torch.arange(width, device=q.device)[None, :] < lengths[:, None]  # (B, W)
    live = keep[:, None, :, None]  # (B, 1, W, 1)

    def gather(cache):
        return torch.where(live, gather_blocks(cache, table), 0)  # (B, Hkv, W, D)

    out = F.scaled_dot_product_attention(q[:, :, None], gather(k_cache), gather(v_cache),
                                         attn_mask=keep[:, None, None, :], scale=scale,
                                         enable_gqa=H != kv_heads)  # (B, H, 1, D)
    return out[:, :, 0]


def _check(q, k_cache, v_cache, block_table, lengths):
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, D), got {tuple(q.shape)}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, Hkv, PAGE, D), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, H, D = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[3] != D or H % kv_heads:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}: head dims must match "
                         f"and the query heads must be a multiple of the kv heads")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_table.dtype != torch.int32 or block_table.ndim != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be int32 (B, max_blocks) with B = {B}, "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if lengths.dtype != torch.int32 or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be int32 ({B},), got {lengths.dtype} {tuple(lengths.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def decode_attention(q, k_cache, v_cache, block_table, lengths, *, scale=None, backend="auto"):
    """softmax(q kᵀ · scale) v for each sequence b over its keys 0 … lengths[b]−1 → (B, H, D).

    Lengths past the table's width (max_blocks·PAGE) are read as the width; they are not checked, which would
    cost a device sync per step. A sequence of length 0 (a free slot padding a batch) gets zeros.
    """
    _check(q, k_cache, v_cache, block_table, lengths)

    def run_triton():
        from rfserve.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, block_table, lengths, scale=scale)

    def run_torch():
        return decode_attention_torch(q, k_cache, v_cache, block_table, lengths, scale=scale)

    B, H, D = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    return dispatch.run("decode_attention", (H, kv_heads, D, q.dtype), q.device, backend, run_triton,
                        run_torch, unsupported=dispatch.triton_unsupported("decode_attention", D),
                        sizes=(B, block_table.shape[1] * page))
