"""The per-row low-rank update of a batch whose rows use different LoRA adapters (S-LoRA / Punica style).

Each row gathers its own adapters' A and B from the stacked slots and the update is two batched matmuls over
the rows, so a batch of rows with different adapters costs one launch per layer, not one per adapter. Slot 0
holds zeros ("no adapter"), so a row without one adds an exact zero, and a row combining fewer adapters than K
fills its other columns with slot 0. Everything is indexed by tensors, never by Python values that change from
call to call, so a compiled static-shape graph (and a CUDA graph) serves every binding of adapters to rows.

This is the torch twin; a fused gather-and-matmul Triton kernel would pair with it through `kernels.dispatch`.
"""
from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """Σ_k scales[:, k] · (x @ A[slots[:, k]]ᵀ) @ B[slots[:, k]]ᵀ for each row.

    x (R, L, in) or (R, in); a (S, r, in); b (S, out, r); slots (R, K) integer; scales (R, K).
    Returns (R, L, out) or (R, out) in x's dtype.
    """
    rows, k = slots.shape
    if x.shape[0] != rows:
        raise ValueError(f"x has {x.shape[0]} rows but slots bind {rows}")
    flat = x.ndim == 2
    h = x.unsqueeze(1) if flat else x                                  # (R, L, in)
    r = a.shape[1]
    a_rows = a[slots].reshape(rows, k * r, a.shape[2])                 # (R, K·r, in): the K adapters side by side
    b_rows = b[slots].permute(0, 2, 1, 3).reshape(rows, b.shape[1], k * r)   # (R, out, K·r)
    low = torch.bmm(h, a_rows.transpose(1, 2))                         # (R, L, K·r)
    low = (low.view(rows, -1, k, r) * scales.to(low.dtype).view(rows, 1, k, 1)).view(rows, -1, k * r)
    out = torch.bmm(low, b_rows.transpose(1, 2))                       # (R, L, out)
    return out.squeeze(1) if flat else out
