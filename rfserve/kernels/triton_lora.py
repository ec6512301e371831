"""The per-row multi-LoRA update in Triton: a gather-and-shrink kernel, then a gather-and-expand kernel
(Punica's BGMV / S-LoRA's shrink and expand, with K adapters per row).

Shrink: low[r, l, k, :] = scales[r, k] · x[r, l] @ A[slots[r, k]]ᵀ. One program takes one row and BLOCK_M of its
tokens, and gathers the K slots' A side by side into one (BLOCK_K, K_PAD·R_PAD) operand, column j holding
adapter j // R_PAD's rank j % R_PAD: each x tile is read once for all K adapters, and the K products are a
single tl.dot. Columns of slot 0 (the zero adapter) are masked, so they load nothing, and a row whose every
slot is 0 skips the loop over `in`: rows without an adapter read neither x nor A.
Expand: out[r, l, :] = Σ_k low[r, l, k, :] @ B[slots[r, k]]ᵀ, one program per (row, BLOCK_M tokens, BLOCK_N
outputs), the K adapters a loop over rank-deep dots into one fp32 accumulator.

Why two kernels. One fused kernel needs all of a token tile's rank columns before any output: either each
output tile recomputes the shrink (out / BLOCK_N times its FLOPs, 10x at out 1280 and BLOCK_N 128, where the
shrink alone is already a sixth of the base layer's work at K·r = 256), or one program per (row, token tile)
walks every output tile, which leaves 4 programs for SD's cross-attention keys (2 rows of 77 tokens) on a
132-SM H100. Two kernels keep the expand's grid over outputs; the price is `low`, (R, L, K, rank) in B's
dtype, written and read once: the twin materialises the same (R, L, K·rank) product. Not timed against a
fused variant on a GPU yet (none here); the argument is the count above.

Slots and scales are tensors the kernels read, never constexprs or shapes, so one binary and one CUDA graph
serve every binding of adapters to rows; slot ids are not range-checked (that would cost a sync). Both
kernels accumulate in fp32; `low` is rounded to the layers' dtype at the points where the twin rounds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rfserve.kernels import tuning
from rfserve.kernels.launch import Launch, check_device, interpreting
from rfserve.kernels.lora import adapter_pads
from rfserve.kernels.triton_autotune import Tuner
from rfserve.kernels.triton_lang import tl, triton

INTERPRETER_SHRINK = {"BLOCK_M": 16, "BLOCK_K": 32}
INTERPRETER_EXPAND = {"BLOCK_M": 16, "BLOCK_N": 32}


def _shrink_configs() -> list[triton.Config]:
    """(BLOCK_M, BLOCK_K, warps, stages): 16 tokens for the no-token (R, in) layers and short sequences,
    larger token tiles where x is long."""
    tiles = [(16, 128, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3), (64, 32, 8, 4), (128, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in tiles]


def _expand_configs() -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages): the reduction is only K·rank deep, so the tile is the output's."""
    tiles = [(16, 128, 4, 2), (32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


@triton.jit(do_not_specialize=["L", "K", "ROWS_BUCKET", "L_BUCKET"])
def _lora_shrink(
    X, A, SLOTS, SCALES, LOW,
    stride_xr, stride_xl, stride_xi,
    stride_as, stride_ar, stride_ai,
    stride_sr, stride_sk, stride_cr, stride_ck,
    stride_lr, stride_ll, stride_lk,
    L, IN, RANK, K,
    ROWS_BUCKET, L_BUCKET,  # unread: the autotuner's key (`tuning.bucket` of R and L)
    K_PAD: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    cols = tl.arange(0, K_PAD * R_PAD)
    col_k = cols // R_PAD  # which of the row's adapters a column belongs to
    col_r = cols % R_PAD   # and which of its ranks
    k_ok = col_k < K
    slot = tl.load(SLOTS + row * stride_sr + col_k * stride_sk, mask=k_ok, other=0).to(tl.int64)
    scale = tl.load(SCALES + row * stride_cr + col_k * stride_ck, mask=k_ok, other=0.0)
    live = k_ok & (col_r < RANK) & (slot != 0)  # the columns that read an adapter
    hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, IN, 0)

    x_base = X + row * stride_xr + offs_m[:, None] * stride_xl                 # (BLOCK_M, 1)
    a_base = A + slot[None, :] * stride_as + col_r[None, :] * stride_ar        # (1, COLS): each column's row of A
    acc = tl.zeros([BLOCK_M, K_PAD * R_PAD], dtype=tl.float32)
    for start in range(0, hi, BLOCK_K):
        offs_i = start + tl.arange(0, BLOCK_K)
        i_ok = offs_i < IN
        x = tl.load(x_base + offs_i[None, :] * stride_xi, mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        a = tl.load(a_base + offs_i[:, None] * stride_ai, mask=i_ok[:, None] & live[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)                     # (BLOCK_M, COLS)

    # Rounded where the twin rounds (the product, the scale, their product, all in LOW's dtype), so that the
    # dispatcher's first-launch check against the twin holds at fp16's tolerance on rank-64 layers.
    dtype = LOW.dtype.element_ty
    low = acc.to(dtype).to(tl.float32) * scale.to(dtype).to(tl.float32)[None, :]
    ptrs = LOW + row * stride_lr + offs_m[:, None] * stride_ll + col_k[None, :] * stride_lk + col_r[None, :]
    tl.store(ptrs, low.to(dtype), mask=m_ok[:, None] & (k_ok & (col_r < RANK))[None, :])


@triton.jit(do_not_specialize=["L", "K", "ROWS_BUCKET", "L_BUCKET"])
def _lora_expand(
    LOW, B, SLOTS, OUT,
    stride_lr, stride_ll, stride_lk,
    stride_bs, stride_bo, stride_br,
    stride_sr, stride_sk,
    stride_or, stride_ol, stride_on,
    L, N_OUT, RANK, K,
    ROWS_BUCKET, L_BUCKET,  # unread: the autotuner's key (`tuning.bucket` of R and L)
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < L
    n_ok = offs_n < N_OUT
    r_ok = offs_r < RANK
    low_base = LOW + row * stride_lr + offs_m[:, None] * stride_ll + offs_r[None, :]          # (BLOCK_M, R_PAD)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(K):
        slot = tl.load(SLOTS + row * stride_sr + k * stride_sk).to(tl.int64)
        live = slot != 0  # the zero adapter adds nothing: load neither its low columns nor its B
        low = tl.load(low_base + k * stride_lk, mask=m_ok[:, None] & r_ok[None, :] & live, other=0.0)
        b = tl.load(B + slot * stride_bs + offs_n[None, :] * stride_bo + offs_r[:, None] * stride_br,
                    mask=r_ok[:, None] & n_ok[None, :] & live, other=0.0)                   # (R_PAD, BLOCK_N)
        acc = tl.dot(low, b, acc, input_precision=PRECISION)
    out = OUT + row * stride_or + offs_m[:, None] * stride_ol + offs_n[None, :] * stride_on
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Keyed on the layer's width, the padded adapter columns and the row and token buckets, never on slot values.
_SHRINK = Tuner(_lora_shrink, _shrink_configs(), key=["ROWS_BUCKET", "L_BUCKET", "IN", "K_PAD", "R_PAD"],
                buckets=("ROWS_BUCKET", "L_BUCKET"))
_EXPAND = Tuner(_lora_expand, _expand_configs(), key=["ROWS_BUCKET", "L_BUCKET", "N_OUT", "R_PAD"],
                buckets=("ROWS_BUCKET", "L_BUCKET"))


@dataclass(frozen=True)
class LoraCall:
    """Both launches of one call; `out` (R, L, out) is what the expand writes."""

    shrink: Launch
    expand: Launch
    out: torch.Tensor


def lora_launches(x, a, b, slots, scales, *, out=None) -> LoraCall:
    """The two kernels' arguments for x (R, L, in), any strides (a 1x1 conv's (R, H·W, C) view of NCHW
    included). Nothing here reads a tensor's values, so the call can be captured in a CUDA graph."""
    R, L, _ = x.shape
    _, rank, n_in = a.shape
    n_out = b.shape[1]
    k = slots.shape[1]
    if out is None:
        out = torch.empty(R, L, n_out, device=x.device, dtype=x.dtype)
    low = torch.empty(R, L, k, rank, device=x.device, dtype=b.dtype)   # scaled x·Aᵀ per adapter
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    buckets = (tuning.bucket(R), tuning.bucket(L))
    k_pad, r_pad = adapter_pads(k, rank)
    shrink = Launch(_lora_shrink, (
        x, a, slots, scales, low, *x.stride(), *a.stride(), *slots.stride(), *scales.stride(), *low.stride()[:3],
        L, n_in, rank, k, *buckets,
    ), dict(K_PAD=k_pad, R_PAD=r_pad, PRECISION=precision), _SHRINK.configs)
    expand = Launch(_lora_expand, (
        low, b, slots, out, *low.stride()[:3], *b.stride(), *slots.stride(), *out.stride(), L, n_out, rank, k,
        *buckets,
    ), dict(R_PAD=r_pad, PRECISION=precision), _EXPAND.configs)
    return LoraCall(shrink, expand, out)


def lora_delta_triton(x, a, b, slots, scales, *, out=None):
    """Launch both kernels on x (R, L, in); under the interpreter with the INTERPRETER_* tiles."""
    check_device(x, "LoRA")
    call = lora_launches(x, a, b, slots, scales, out=out)
    R, L, _ = x.shape
    n_out = b.shape[1]
    if interpreting():  # autotune needs a live driver (shared/reference/kernels.md §2c)
        _lora_shrink[(triton.cdiv(L, INTERPRETER_SHRINK["BLOCK_M"]), R)](
            *call.shrink.args, **call.shrink.constexprs, **INTERPRETER_SHRINK)
        _lora_expand[(triton.cdiv(L, INTERPRETER_EXPAND["BLOCK_M"]), triton.cdiv(n_out, INTERPRETER_EXPAND["BLOCK_N"]),
                      R)](*call.expand.args, **call.expand.constexprs, **INTERPRETER_EXPAND)
    else:
        _SHRINK.launch(lambda m: (triton.cdiv(L, m["BLOCK_M"]), R), call.shrink.args, call.shrink.constexprs)
        _EXPAND.launch(lambda m: (triton.cdiv(L, m["BLOCK_M"]), triton.cdiv(n_out, m["BLOCK_N"]), R),
                       call.expand.args, call.expand.constexprs)
    return call.out
