"""Scaled dot-product attention: the Triton kernel or its SDPA twin, chosen per shape by the dispatcher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rfserve.kernels import dispatch


def attention_torch(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """The twin. SDPA takes no `is_causal` together with a mask, so both are folded into one bool mask."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()  # (B, 1, Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def _check(q, k, v, key_padding_mask):
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be bool (B, Lk) = {(k.shape[0], k.shape[2])}, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, backend="auto"):
    """softmax(q kᵀ · scale) v over (B, H, L, D) inputs; `key_padding_mask` (B, Lk) is True where a key is kept."""
    _check(q, k, v, key_padding_mask)

    def run_triton():
        from rfserve.kernels.triton_attention import attention_triton

        return attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def run_torch():
        return attention_torch(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    B, H, Lq, D = q.shape
    key = (H, D, q.dtype, causal, key_padding_mask is not None)
    return dispatch.run("attention", key, q.device, backend, run_triton, run_torch,
                        unsupported=dispatch.triton_unsupported("attention", D), sizes=(B, Lq, k.shape[2]))
