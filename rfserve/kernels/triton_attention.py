"""FlashAttention-2 forward in Triton, shaped for diffusion models rather than for the tutorial's benchmark.

Differences from triton-lang's 06-fused-attention tutorial, each one a shape we serve:
- separate query and key lengths with boundary masks (cross-attention against 77 CLIP tokens);
- head dims that are not powers of two (40, 72, 80, 88, 160), padded to HEAD_DIM_PAD and masked;
- an optional key-padding mask;
- strides passed in, so (B, L, H, D) projections viewed as (B, H, L, D) need no copy;
- tuned per power-of-two bucket of the lengths, not per length, and never after the server is ready
  (`kernels.autotune`): lengths are not specialised on, so a new length in a tuned bucket compiles nothing.
Causal masking is upper-left aligned (key j visible to query i iff j <= i), as in SDPA's `is_causal`.
Rows with every key masked return zeros, as SDPA does.
"""
from __future__ import annotations

import math

import torch

from rfserve.kernels import tuning
from rfserve.kernels.autotune import Tuner
from rfserve.kernels.launch import Launch, check_device, interpreting
from rfserve.kernels.triton_lang import tl, triton

LOG2E = 1.4426950408889634
# Interpreter programs run one after another in numpy; small tiles still exercise every mask path.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}


def _configs() -> list[triton.Config]:
    """The tutorial's search space, trimmed so that warm-up tunes each new shape in seconds, not minutes, plus
    (64, 32, 2, 8): the one tile of head dim 160 that neither spills nor overflows shared memory on an A100."""
    tiles = [(64, 32, 3, 4), (64, 64, 3, 4), (64, 64, 4, 4), (128, 32, 3, 4),
             (128, 32, 4, 8), (128, 64, 2, 8), (128, 64, 3, 8), (128, 128, 2, 8), (64, 32, 2, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
            for bm, bn, stages, warps in tiles]


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, k_base, v_base, kpm_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    offs_m, lo, hi, N_KV, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi). MASKED tiles may cross N_KV or the causal diagonal."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_KV
        if MASKED:
            kt_mask = d_ok[:, None] & n_ok[None, :]
            v_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn, mask=kt_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n * stride_mn, mask=n_ok, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _aligned(stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """Tell the compiler what the launch checked: each stride is a multiple of ALIGN elements. Without it,
    a head stride of 88 (not a multiple of 16, so not specialised) leaves row starts of unknown alignment,
    every load goes element by element, and 4 of the 8 configurations spill registers at head dim 88.
    `tl.multiple_of` on a scalar argument is dropped (it sets an attribute a block argument cannot hold);
    dividing and multiplying back is exact and the compiler's alignment analysis reads it."""
    return (stride_b // ALIGN) * ALIGN, (stride_h // ALIGN) * ALIGN, (stride_n // ALIGN) * ALIGN


@triton.jit(do_not_specialize=["N_Q", "N_KV", "N_Q_BUCKET", "N_KV_BUCKET"])
def _attn_fwd(
    Q, K, V, O, KPM, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, N_Q, N_KV,
    N_Q_BUCKET, N_KV_BUCKET,  # unread: the autotuner's key (`tuning.bucket` of N_Q and N_KV)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    stride_qb, stride_qh, stride_qm = _aligned(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_om = _aligned(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)  # (BLOCK_M, HEAD_DIM_PAD)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Tiles below `lo` need no mask at all; tiles in [lo, hi) cross N_KV or the causal diagonal.
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    lo = n_full
    hi = N_KV
    if CAUSAL:
        lo = tl.minimum(n_full, (start_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(N_KV, (start_m + 1) * BLOCK_M)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        offs_m, 0, lo, N_KV, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, CAUSAL, HAS_KPM, PRECISION)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        offs_m, lo, hi, N_KV, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, CAUSAL, HAS_KPM, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)


_TUNER = Tuner(_attn_fwd, _configs(), key=["N_Q_BUCKET", "N_KV_BUCKET", "HEAD_DIM_PAD", "CAUSAL", "HAS_KPM",
                                           "STRIDE_ALIGN"], buckets=("N_Q_BUCKET", "N_KV_BUCKET"))


def stride_align(*tensors: torch.Tensor) -> int:
    """The largest power of two, at most 16, dividing every stride but the last of each (B, H, L, D) tensor."""
    g = 16
    for t in tensors:
        for stride in t.stride()[:-1]:
            g = math.gcd(g, stride)
    return g


def head_dim_pad(d: int) -> int:
    """tl.dot and tl.arange need a power of two of at least 16."""
    return max(16, triton.next_power_of_2(d))


def attention_launch(q, k, v, *, causal=False, key_padding_mask=None, scale=None, out=None) -> Launch:
    """The kernel's arguments for one call. `out` (B, H, Lq, D) may be preallocated; by default it is laid out
    (B, Lq, H, D) so that the usual `.transpose(1, 2).reshape(B, Lq, H*D)` afterwards costs no copy."""
    B, H, Lq, D = q.shape
    if out is None:
        out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, H, Lq, D)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8)  # (B, Lk); bool pointers do not load in every Triton version
        mask_strides = (kpm.stride(0), kpm.stride(1))
    else:
        kpm, mask_strides = q, (0, 0)  # never read: HAS_KPM is False
    scale = D ** -0.5 if scale is None else scale
    args = (
        q, k, v, out, kpm, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        H, Lq, k.shape[2], tuning.bucket(Lq), tuning.bucket(k.shape[2]),
    )
    meta = dict(
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", STRIDE_ALIGN=stride_align(q, k, v, out),
    )
    return Launch(_attn_fwd, args, meta, _TUNER.configs)


def attention_triton(q, k, v, *, causal=False, key_padding_mask=None, scale=None, out=None):
    """Launch the kernel (see `attention_launch` for `out`); under the interpreter with INTERPRETER_CONFIG."""
    check_device(q, "attention")
    launch = attention_launch(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, out=out)
    B, H, Lq, _ = q.shape
    if interpreting():  # autotune needs a live driver (shared/reference/kernels.md §2c)
        grid = (triton.cdiv(Lq, INTERPRETER_CONFIG["BLOCK_M"]), B * H)
        _attn_fwd[grid](*launch.args, **launch.constexprs, **INTERPRETER_CONFIG)
    else:
        _TUNER.launch(lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H), launch.args, launch.constexprs)
    return launch.args[3]
