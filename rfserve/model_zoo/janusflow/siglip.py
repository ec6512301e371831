"""The understanding encoder: SigLIP ViT features for JanusFlow's chat path.

Parameter names follow the official `CLIPVisionTower` → timm-style `VisionTransformer`
(`vision_tower.patch_embed.proj`, `vision_tower.blocks.N.attn.qkv`, ...), so the official
weights load as they are. The official tower is built with `ignore_head=True` and no class
token, so its output is the final-norm feature map of every patch: (B, N, width).
Its `attn_pool` head exists in the checkpoint but never runs; see `loading.UNUSED_OFFICIAL_KEYS`.
Attention goes through the kernel dispatcher (`kernels.attention`), whose twin is the SDPA call the official
tower makes.
"""
from __future__ import annotations

import torch
from torch import nn

from rfserve import kernels
from rfserve.model_zoo.janusflow.config import UnderstandingConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)          # (B, N, width), row-major patches


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B, h, N, d)
        out = kernels.attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: UnderstandingConfig):
        super().__init__()
        a = cfg.arch
        self.patch_embed = PatchEmbed(a.patch_size, a.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, a.width))
        self.blocks = nn.Sequential(*[Block(a.width, a.heads, a.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(a.width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        return self.norm(self.blocks(x))


class UnderstandingEncoder(nn.Module):
    """`vision_und_enc_model`: optional pixel normalisation, then the tower."""

    def __init__(self, cfg: UnderstandingConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(cfg)
        mean, std = cfg.pixel_mean, cfg.pixel_std
        self.norm_stats = None if mean is None or std is None else (tuple(mean), tuple(std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) as the image processor makes them → (B, N, width)."""
        if self.norm_stats is not None:
            mean, std = (torch.tensor(s, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
                         for s in self.norm_stats)
            images = (images - mean) / std
        return self.vision_tower(images)
