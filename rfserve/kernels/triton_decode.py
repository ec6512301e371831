"""Decode attention in Triton: one new query row per sequence against its keys in a paged KV cache, split
along the keys ("flash decoding") so that a few sequences still fill the GPU.

Layout. `k_cache`, `v_cache` are (num_blocks, Hkv, PAGE, D), any strides; `block_table` (B, max_blocks) int32
maps a sequence's logical block j (its positions j·PAGE … j·PAGE+PAGE−1) to a physical block; `lengths` (B,)
int32 is how many keys each sequence has, and it attends to positions 0 … length−1. The slot cache of
`model_zoo/janusflow/decoder.py`, (slots, Hkv, max_len, D), is this layout with PAGE = max_len and the block
table `arange(b)[:, None]` (row i of the cache is sequence i's single block); its `positions` are the
column each new token is written to, so lengths = positions + 1.

Why the grid looks as it does. Lengths and the block table are tensors the kernel reads, never shapes: the
grid (B·Hkv, NUM_SPLITS) and the number of splits come from (B, Hkv, max_blocks·PAGE) alone, so one compiled
kernel and one captured CUDA graph serve every mix of lengths. Each program takes one sequence, one kv head
with its GROUP = H/Hkv query heads (padded to 16 rows for tl.dot), and one split: the sequence's live tiles
are shared out evenly among the splits, so a step costs the live keys, not the cache width, and short
sequences still spread over every split. A split with no live tile loads nothing and writes an empty partial
(max −inf, sum 0). Partials (max, sum, accumulator) go to fp32 scratch in log2 units; `_decode_combine`
merges the splits. Keys are gathered one row at a time through the block table, so a tile may cross pages
(BLOCK_N > PAGE) or stay inside one; no relation between BLOCK_N and PAGE is assumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rfserve.kernels import tuning
from rfserve.kernels.launch import Launch, check_device, interpreting
from rfserve.kernels.triton_attention import LOG2E, head_dim_pad
from rfserve.kernels.triton_autotune import Tuner
from rfserve.kernels.triton_lang import tl, triton

INTERPRETER_CONFIG = {"BLOCK_N": 16}
# Splits: enough programs to give every SM of an H100 (132) about two, never more than MAX_SPLITS, and no
# split shorter than MIN_SPLIT_KEYS of the cache width, where the combine would cost more than it saves.
TARGET_PROGRAMS, MAX_SPLITS, MIN_SPLIT_KEYS = 256, 16, 64
COMBINE_CONFIGS = [triton.Config({})]  # Triton's default warps and stages: it reads a few KB per row


def _configs() -> list[triton.Config]:
    """A few tiles: decode reads each key once, so the search is over how much to keep in flight."""
    tiles = [(16, 2, 2), (32, 2, 2), (32, 4, 2), (32, 4, 3), (64, 4, 1), (64, 4, 2), (64, 4, 3)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages) for bn, warps, stages in tiles]


@triton.jit(do_not_specialize=["WIDTH", "WIDTH_BUCKET", "NUM_SPLITS"])
def _decode_split(
    Q, K, V, TABLE, LENGTHS, M_PART, L_PART, ACC_PART, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_tj, stride_lb,
    KV_HEADS, WIDTH, PAGE, NUM_SPLITS,
    WIDTH_BUCKET,  # unread: the autotuner's key (`tuning.bucket` of WIDTH)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # the query heads reading this kv head
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (GROUP_PAD, HEAD_DIM_PAD)

    # This split's share of the live tiles; a length beyond the table's width is read as the width.
    length = tl.minimum(tl.load(LENGTHS + b * stride_lb), WIDTH)
    per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        block = tl.load(TABLE + b * stride_tb + (offs_n // PAGE) * stride_tj, mask=n_ok, other=0).to(tl.int64)
        row = offs_n % PAGE
        kt = tl.load(k_head + block[None, :] * stride_kb + row[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (HEAD_DIM_PAD, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (GROUP_PAD, BLOCK_N), log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a tile's first key is always live
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + block[:, None] * stride_vb + row[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, HEAD_DIM_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = (b * KV_HEADS * GROUP + heads) * NUM_SPLITS + split  # (GROUP_PAD,) rows of (B, H, NUM_SPLITS)
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)
    tl.store(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine(
    M_PART, L_PART, ACC_PART, O, stride_ob, stride_oh, stride_od, H, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One (sequence, head) per program: rescale each split's partial to the common max and normalise once.
    A sequence with no key (length 0, a free slot padding a batch) gets zeros, as SDPA gives a masked row."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    part = bh * NUM_SPLITS + offs_s
    m = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(L_PART + part, mask=s_ok, other=0.0)
    acc = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)  # (SPLITS_PAD, HEAD_DIM_PAD)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    den = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(den == 0.0, 1.0, den)
    b, h = bh // H, bh % H
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=d_ok)


# Keyed on shapes only, with the width by bucket: lengths change every step and must never trigger tuning (or a
# graph recapture), and the eager step's width (the longest live row) must not either.
_TUNER = Tuner(_decode_split, _configs(), key=["KV_HEADS", "WIDTH_BUCKET", "NUM_SPLITS", "HEAD_DIM_PAD", "GROUP_PAD"],
               buckets=("WIDTH_BUCKET", "NUM_SPLITS"))


def num_splits(batch: int, kv_heads: int, width: int) -> int:
    """Splits per (sequence, kv head), from shapes alone (see TARGET_PROGRAMS)."""
    return max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads), triton.cdiv(width, MIN_SPLIT_KEYS)))


@dataclass(frozen=True)
class DecodeCall:
    """Both launches of one call and the split kernel's grid; `out` is what the combine writes."""

    split: Launch
    combine: Launch
    grid: tuple[int, int]
    out: torch.Tensor


def decode_launches(q, k_cache, v_cache, block_table, lengths, *, scale=None, out=None) -> DecodeCall:
    """The two kernels' arguments for one call, with fp32 scratch for the partials. Nothing here reads a
    tensor's values, so the call can be captured in a CUDA graph."""
    B, H, D = q.shape
    _, kv_heads, page, _ = k_cache.shape
    width = block_table.shape[1] * page
    splits = num_splits(B, kv_heads, width)
    if out is None:
        out = torch.empty_like(q)
    m_part = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    scale = D ** -0.5 if scale is None else scale
    d_pad = head_dim_pad(D)
    group = H // kv_heads
    split = Launch(_decode_split, (
        q, k_cache, v_cache, block_table, lengths, m_part, l_part, acc_part, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(), lengths.stride(0),
        kv_heads, width, page, splits, tuning.bucket(width),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32"), _TUNER.configs)
    combine = Launch(_decode_combine, (m_part, l_part, acc_part, out, *out.stride(), H, splits),
                     dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(splits)),
                     COMBINE_CONFIGS)
    return DecodeCall(split, combine, (B * kv_heads, splits), out)


def decode_attention_triton(q, k_cache, v_cache, block_table, lengths, *, scale=None, out=None):
    """Launch both kernels; under the interpreter the split kernel runs with INTERPRETER_CONFIG."""
    check_device(q, "decode attention")
    call = decode_launches(q, k_cache, v_cache, block_table, lengths, scale=scale, out=out)
    if interpreting():  # autotune needs a live driver (shared/reference/kernels.md §2c)
        _decode_split[call.grid](*call.split.args, **call.split.constexprs, **INTERPRETER_CONFIG)
    else:
        _TUNER.launch(call.grid, call.split.args, call.split.constexprs)
    _decode_combine[(q.shape[0] * q.shape[1],)](*call.combine.args, **call.combine.constexprs)
    return call.out
