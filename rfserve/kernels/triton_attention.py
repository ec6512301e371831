"""FlashAttention-2 forward in Triton, shaped for diffusion models rather than for the tutorial's benchmark.

Differences from triton-lang's 06-fused-attention tutorial, each one a shape we serve:
- separate query and key lengths with boundary masks (cross-attention against 77 CLIP tokens);
- head dims that are not powers of two (40, 72, 80, 88, 160), split into at most two power-of-two chunks
  (`head_dim_chunks`: 80 = 64+16, 160 = 128+32, 88 -> 64+32) rather than padded to one (80 -> 128,
  160 -> 256): every tl.dot runs over its full width, so padding is tensor-core work on zeros and
  accumulator registers. Only a chunk that crosses the head dim is masked along it;
- an optional key-padding mask;
- strides passed in, so (B, L, H, D) projections viewed as (B, H, L, D) need no copy;
- tuned per power-of-two bucket of the lengths, not per length, and never after the server is ready
  (`kernels.triton_autotune`): lengths are not specialised on, so a new length in a tuned bucket compiles nothing.
Causal masking is upper-left aligned (key j visible to query i iff j <= i), as in SDPA's `is_causal`.
Rows with every key masked return zeros, as SDPA does.
"""
from __future__ import annotations

import math

import torch

from rfserve.kernels import tuning
from rfserve.kernels.launch import Launch, check_device, interpreting
from rfserve.kernels.triton_autotune import Tuner
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
def _mask(len_ok, dim_ok, MASK_LEN: tl.constexpr, MASK_DIM: tl.constexpr):
    """The bounds a tile checks (at least one): the length where the tile may cross it, the head dim where
    its chunk does. Both arguments are already shaped to broadcast against the tile."""
    if MASK_LEN and MASK_DIM:
        mask = len_ok & dim_ok
    elif MASK_LEN:
        mask = len_ok
    else:
        mask = dim_ok
    return mask


@triton.jit
def _load(ptrs, len_ok, dim_ok, MASK_LEN: tl.constexpr, MASK_DIM: tl.constexpr):
    """A tile with zeros outside the bounds, and no mask at all where it crosses none: a mask the compiler
    cannot prove all-true costs the loads their vector width."""
    if MASK_LEN or MASK_DIM:
        tile = tl.load(ptrs, mask=_mask(len_ok, dim_ok, MASK_LEN, MASK_DIM), other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _chunk(base, offs_len, stride_len, stride_d, START: tl.constexpr, WIDTH: tl.constexpr,
           HEAD_DIM: tl.constexpr):
    """Pointers to the (len, WIDTH) tile of head-dim columns [START, START + WIDTH), and which of those
    columns lie inside the head dim, shaped (1, WIDTH)."""
    offs_d = START + tl.arange(0, WIDTH)
    ptrs = base + offs_len[:, None] * stride_len + offs_d[None, :] * stride_d
    return ptrs, (offs_d < HEAD_DIM)[None, :]


@triton.jit
def _scores(q, k_base, offs_n, n_ok, stride_kn, stride_kd, START: tl.constexpr, WIDTH: tl.constexpr,
            HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk's share of Q·Kᵀ: q (BLOCK_M, WIDTH) @ Kᵀ rows [START, START + WIDTH) -> (BLOCK_M, BLOCK_N)."""
    offs_d = START + tl.arange(0, WIDTH)
    kt_ptrs = k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn  # (WIDTH, BLOCK_N)
    kt = _load(kt_ptrs, n_ok[None, :], (offs_d < HEAD_DIM)[:, None], MASKED, START + WIDTH > HEAD_DIM)
    return tl.dot(q, kt, input_precision=PRECISION)


@triton.jit
def _values(acc, alpha, p, v_base, offs_n, n_ok, stride_vn, stride_vd, START: tl.constexpr,
            WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk's accumulator (BLOCK_M, WIDTH), rescaled by alpha, plus P @ V's columns [START, START + WIDTH)."""
    v_ptrs, d_ok = _chunk(v_base, offs_n, stride_vn, stride_vd, START, WIDTH, HEAD_DIM)
    v = _load(v_ptrs, n_ok[:, None], d_ok, MASKED, START + WIDTH > HEAD_DIM)
    return acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)


@triton.jit
def _attn_tiles(
    acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kpm_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    offs_m, lo, hi, N_KV, qk_scale,
    HEAD_DIM: tl.constexpr, CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi). MASKED tiles may cross N_KV or the causal diagonal.
    The head dim is two chunks, [0, CHUNK0) and [CHUNK0, CHUNK0 + CHUNK1): scores sum both chunks' dots, and
    each chunk keeps its own accumulator. With CHUNK1 = 0, q1 and acc1 are None and never touched."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_KV
        s = _scores(q0, k_base, offs_n, n_ok, stride_kn, stride_kd, 0, CHUNK0, HEAD_DIM, MASKED, PRECISION)
        if CHUNK1 > 0:
            s += _scores(q1, k_base, offs_n, n_ok, stride_kn, stride_kd, CHUNK0, CHUNK1, HEAD_DIM, MASKED,
                         PRECISION)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
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
        p = p.to(v_base.dtype.element_ty)
        acc0 = _values(acc0, alpha, p, v_base, offs_n, n_ok, stride_vn, stride_vd, 0, CHUNK0, HEAD_DIM, MASKED,
                       PRECISION)
        if CHUNK1 > 0:
            acc1 = _values(acc1, alpha, p, v_base, offs_n, n_ok, stride_vn, stride_vd, CHUNK0, CHUNK1, HEAD_DIM,
                           MASKED, PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


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
    HEAD_DIM: tl.constexpr, CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    m_ok = (offs_m < N_Q)[:, None]
    q_base = Q + b * stride_qb + h * stride_qh
    o_base = O + b * stride_ob + h * stride_oh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_mb

    q_ptrs, d_ok = _chunk(q_base, offs_m, stride_qm, stride_qd, 0, CHUNK0, HEAD_DIM)
    q0 = _load(q_ptrs, m_ok, d_ok, True, CHUNK0 > HEAD_DIM)  # (BLOCK_M, CHUNK0)
    acc0 = tl.zeros([BLOCK_M, CHUNK0], dtype=tl.float32)
    q1 = None
    acc1 = None
    if CHUNK1 > 0:
        q_ptrs, d_ok = _chunk(q_base, offs_m, stride_qm, stride_qd, CHUNK0, CHUNK1, HEAD_DIM)
        q1 = _load(q_ptrs, m_ok, d_ok, True, CHUNK0 + CHUNK1 > HEAD_DIM)  # (BLOCK_M, CHUNK1)
        acc1 = tl.zeros([BLOCK_M, CHUNK1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Tiles below `lo` need no mask at all; tiles in [lo, hi) cross N_KV or the causal diagonal.
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    lo = n_full
    hi = N_KV
    if CAUSAL:
        lo = tl.minimum(n_full, (start_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(N_KV, (start_m + 1) * BLOCK_M)
    acc0, acc1, l_i, m_i = _attn_tiles(
        acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mn, offs_m, 0, lo, N_KV, qk_scale, HEAD_DIM, CHUNK0, CHUNK1, BLOCK_N, False, CAUSAL, HAS_KPM,
        PRECISION)
    acc0, acc1, l_i, m_i = _attn_tiles(
        acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mn, offs_m, lo, hi, N_KV, qk_scale, HEAD_DIM, CHUNK0, CHUNK1, BLOCK_N, True, CAUSAL, HAS_KPM,
        PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (BLOCK_M, 1)
    o_ptrs, d_ok = _chunk(o_base, offs_m, stride_om, stride_od, 0, CHUNK0, HEAD_DIM)
    tl.store(o_ptrs, (acc0 / l_safe).to(O.dtype.element_ty), mask=_mask(m_ok, d_ok, True, CHUNK0 > HEAD_DIM))
    if CHUNK1 > 0:
        o_ptrs, d_ok = _chunk(o_base, offs_m, stride_om, stride_od, CHUNK0, CHUNK1, HEAD_DIM)
        tl.store(o_ptrs, (acc1 / l_safe).to(O.dtype.element_ty),
                 mask=_mask(m_ok, d_ok, True, CHUNK0 + CHUNK1 > HEAD_DIM))


_TUNER = Tuner(_attn_fwd, _configs(), key=["N_Q_BUCKET", "N_KV_BUCKET", "CHUNK0", "CHUNK1", "CAUSAL",
                                           "HAS_KPM", "STRIDE_ALIGN"], buckets=("N_Q_BUCKET", "N_KV_BUCKET"))


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


def head_dim_chunks(d: int) -> tuple[int, int]:
    """The widths (CHUNK0, CHUNK1) the kernel splits head dim `d` into: powers of two of at least 16 (what
    tl.dot and tl.arange accept), CHUNK1 = 0 for one chunk, covering `d` with the least padding. Every dot runs
    over the padded width, so padding is tensor-core work on zeros and accumulator registers: one chunk pads
    80 to 128 and 160 to 256, two chunks (64+16, 128+32) pad nothing. The first chunk is the largest power of
    two below `d` (a smaller one leaves more than any second chunk can cover); where the pair would be as wide
    as the single padded chunk, one chunk is the cheaper (one dot instead of two)."""
    whole = head_dim_pad(d)
    first = whole // 2
    if first < 16:
        return whole, 0
    second = head_dim_pad(d - first)
    return (whole, 0) if first + second >= whole else (first, second)


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
    chunk0, chunk1 = head_dim_chunks(D)
    args = (
        q, k, v, out, kpm, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        H, Lq, k.shape[2], tuning.bucket(Lq), tuning.bucket(k.shape[2]),
    )
    meta = dict(
        HEAD_DIM=D, CHUNK0=chunk0, CHUNK1=chunk1, CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
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
