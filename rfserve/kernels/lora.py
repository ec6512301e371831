"""The per-row low-rank update of a batch whose rows use different LoRA adapters (S-LoRA / Punica style).

Each row gathers its own adapters' A and B from the stacked slots and the update is two batched matmuls over
the rows, so a batch of rows with different adapters costs one launch per layer, not one per adapter. Slot 0
holds zeros ("no adapter"), so a row without one adds an exact zero, and a row combining fewer adapters than K
fills its other columns with slot 0. Everything is indexed by tensors, never by Python values that change from
call to call, so a compiled static-shape graph (and a CUDA graph) serves every binding of adapters to rows.

`lora_delta` is what the layers call: the dispatcher picks the twin here (`lora_delta_torch`) or the fused
gather-shrink and gather-expand Triton kernels (`triton_lora`) per shape, the twin wherever the kernels cannot
run (no CUDA, mixed dtypes, more adapter columns than `triton_lora.MAX_COLUMNS`).
"""
from __future__ import annotations

import torch

from rfserve.kernels import dispatch, tuning


def lora_delta_torch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """The twin: gather each row's K adapters side by side and run two bmms over the rows."""
    rows, k = slots.shape
    flat = x.ndim == 2
    h = x.unsqueeze(1) if flat else x                                  # (R, L, in)
    r, idx = a.shape[1], slots.reshape(-1)
    a_rows = a.index_select(0, idx).view(rows, k * r, a.shape[2])      # (R, K·r, in): the K adapters side by side
    # B gathered from its (S, r, out) view lands as (R·K, r, out): (R, K·r, out) without a permuting copy.
    b_rows = b.transpose(1, 2).index_select(0, idx).view(rows, k * r, b.shape[1])
    low = torch.bmm(h, a_rows.transpose(1, 2))                         # (R, L, K·r)
    low = (low.view(rows, -1, k, r) * scales.to(low.dtype).view(rows, 1, k, 1)).view(rows, -1, k * r)
    out = torch.bmm(low, b_rows)                                       # (R, L, out)
    return out.squeeze(1) if flat else out


def adapter_pads(adapters: int, rank: int) -> tuple[int, int]:
    """(K_PAD, R_PAD): the kernels' padded adapter count and rank. tl.arange needs powers of two and tl.dot a
    depth of at least 16; the shrink's accumulator is K_PAD·R_PAD columns wide."""
    return tuning.bucket(adapters), max(16, tuning.bucket(rank))


def _unsupported(x, a, b, slots) -> str:
    if not (x.dtype == a.dtype == b.dtype):
        return f"x, A and B dtypes differ ({x.dtype}, {a.dtype}, {b.dtype}): the kernels take one dtype"
    k_pad, r_pad = adapter_pads(slots.shape[1], a.shape[1])
    return dispatch.triton_unsupported("lora", lora_columns=k_pad * r_pad)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
               scales: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Σ_k scales[:, k] · (x @ A[slots[:, k]]ᵀ) @ B[slots[:, k]]ᵀ for each row.

    x (R, L, in) or (R, in); a (S, r, in); b (S, out, r); slots (R, K) integer; scales (R, K).
    Returns (R, L, out) or (R, out) in x's dtype.
    """
    rows, k = slots.shape
    if x.shape[0] != rows:
        raise ValueError(f"x has {x.shape[0]} rows but slots bind {rows}")

    def run_triton():
        from rfserve.kernels.triton_lora import lora_delta_triton

        h = x.unsqueeze(1) if x.ndim == 2 else x                       # (R, L, in)
        out = lora_delta_triton(h, a, b, slots, scales)                # (R, L, out)
        return out.squeeze(1) if x.ndim == 2 else out

    length = 1 if x.ndim == 2 else x.shape[1]
    key = (a.shape[2], b.shape[1], a.shape[1], k, x.dtype, x.ndim)
    return dispatch.run("lora", key, x.device, backend, run_triton, lambda: lora_delta_torch(x, a, b, slots, scales),
                        unsupported=_unsupported(x, a, b, slots), sizes=(rows, length))
