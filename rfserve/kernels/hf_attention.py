"""`attn_implementation="rfserve"` for transformers models: unmasked and causal attention through
`kernels.attention`; anything with an explicit mask, a position bias or a softcap goes to transformers'
own SDPA function unchanged, since the kernel knows only key-padding and causal masks.

Masks are built as for "sdpa", which leaves the mask out (None) wherever `is_causal` alone is exact.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rfserve import kernels
NAME = "rfserve"


def rfserve_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, Lq, D), key/value (B, H_kv, Lk, D) → output (B, Lq, H, D), as transformers expects."""
    if (attention_mask is not None or dropout != 0.0 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (B, H, Lk, D)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # A single query token (decoding) sees the whole cache; upper-left alignment handles longer caches.
    causal = bool(query.shape[2] > 1 and is_causal)
    out = kernels.attention(query, key, value, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, Lq, H, D)


def register() -> str:
    AttentionInterface.register(NAME, rfserve_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
