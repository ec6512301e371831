"""One diffusers attention processor whose core attention goes through `kernels.attention`.

It reproduces diffusers' `AttnProcessor2_0` (UNet2DConditionModel, AutoencoderKL) and, when called
with `image_rotary_emb`, `HunyuanAttnProcessor2_0` (HunyuanDiT2DModel: qk-norm, then 2D RoPE on the
query and, for self-attention, the key). Like those two it uses SDPA's default scale, not `attn.scale`.
Only those two processors are replaced, so fused-QKV, IP-adapter and other processors keep their own
semantics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, HunyuanAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from rfserve import kernels
REPLACED = (AttnProcessor2_0, HunyuanAttnProcessor2_0)


class RfserveAttnProcessor:
    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B, h, Lq or 1, Lk)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Lq, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Lk, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, Lk, d)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, image_rotary_emb)

        if attention_mask is None:
            hidden_states = kernels.attention(query, key, value, backend=self.backend)
        else:
            # diffusers' masks are additive float biases of any value, not a key-padding mask.
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, Lq, h*d)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention(model: torch.nn.Module, backend: str = "auto", required: bool = True) -> int:
    """Swap every AttnProcessor2_0 / HunyuanAttnProcessor2_0 in `model` for RfserveAttnProcessor; with
    `required`, a model with none is an error (the swap would silently do nothing)."""
    processor = RfserveAttnProcessor(backend)
    replaced = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, REPLACED):
            module.set_processor(processor)
            replaced += 1
    if replaced == 0 and required:
        raise ValueError(f"{type(model).__name__} has no attention module with a processor in "
                         f"{[p.__name__ for p in REPLACED]}")
    return replaced
