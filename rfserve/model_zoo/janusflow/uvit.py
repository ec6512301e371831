"""The generation heads around the LLM: a shallow ConvNeXt encoder from VAE latents to LLM
tokens, and its mirror from LLM hidden states back to a velocity.

Module and parameter names follow the official `ShallowUViTEncoder` / `ShallowUViTDecoder`
(janus/janusflow/models/uvit.py) so the checkpoint loads unchanged. Only the inference
path is here: no dropout, and the down/upsample branches of the official `UVitBlock` are
never enabled by these two classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm as RMSNorm

from rfserve.model_zoo.janusflow.config import GenDecoderConfig, GenEncoderConfig


def _channels_last(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a last-dim norm to (B, C, H, W)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN over a channels-last (B, H, W, C) tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)      # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * nx + 1, x)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 → RMSNorm → MLP with GRN, residual, then FiLM from the time embedding."""

    def __init__(self, channels: int, cond_dim: int, eps: float, bias: bool, ffn_factor: int = 4):
        super().__init__()
        inner = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=bias)
        self.norm = RMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner, bias=bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels, bias=bias)
        self.cond_embeds_mapper = nn.Linear(cond_dim, channels * 2, bias=bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)                # (B, H, W, C)
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(h)))
        x = x + h.permute(0, 3, 1, 2)                            # (B, C, H, W)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return torch.addcmul(shift[:, :, None, None], x, (1 + scale)[:, :, None, None])


class UVitBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int, num_blocks: int, eps: float, bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, cond_dim, eps, bias) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class Unpatchify(nn.Module):
    """RMSNorm → 1x1 conv to out·p² → PixelShuffle(p): one 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, bias: bool, patch: int = 2):
        super().__init__()
        self.norm = RMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch * patch, kernel_size=1, bias=bias)
        self.pixel_shuffle = nn.PixelShuffle(patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_channels_last(self.norm, x)))


class ShallowUViTEncoder(nn.Module):
    """(latents (B, 4, h, w), t (B,)) → (tokens (B, C, h/s, w/s), t_emb (B, hidden), skips [x])."""

    def __init__(self, cfg: GenEncoderConfig):
        super().__init__()
        ch = cfg.block_out_channels[0]
        self.time_proj = Timesteps(ch, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(ch, cfg.hidden_size, sample_proj_bias=cfg.use_bias)
        padding = cfg.padding if cfg.padding is not None else cfg.kernel_size - cfg.stride
        self.in_conv = nn.Conv2d(cfg.input_channels, ch, kernel_size=cfg.kernel_size, stride=cfg.stride,
                                 padding=padding)
        self.mid_block = (UVitBlock(cfg.block_out_channels[-1], cfg.hidden_size, cfg.layers_in_middle,
                                    cfg.norm_eps, cfg.use_bias) if cfg.use_mid_block else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        t_emb = self.time_embed(self.time_proj(t.flatten()).view(x.shape[0], -1).to(x.dtype))
        h = self.in_conv(x)
        if self.mid_block is not None:
            h = self.mid_block(h, t_emb)
        return h, t_emb, [h]


class ShallowUViTDecoder(nn.Module):
    """(LLM features (B, C, h', w'), skips, t_emb) → velocity (B, out, h'·2^u, w'·2^u)."""

    def __init__(self, cfg: GenDecoderConfig):
        super().__init__()
        skip = cfg.block_out_channels[-1]
        self.mid_block = (UVitBlock(cfg.in_channels + skip, cfg.hidden_size, cfg.layers_in_middle,
                                    cfg.norm_eps, cfg.use_bias) if cfg.use_mid_block else None)
        self.out_convs = nn.ModuleList(
            Unpatchify(skip + cfg.in_channels if rank == 0 else skip,
                       cfg.out_channels if rank == cfg.upsamples - 1 else skip, cfg.norm_eps, cfg.use_bias)
            for rank in range(cfg.upsamples))
        self.input_norm = RMSNorm(cfg.in_channels, cfg.norm_eps)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([_channels_last(self.input_norm, x), skips[-1]], dim=1)   # (B, in + skip, h', w')
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x
