"""Image shapes and the 2D rotary position tables that depend on them.

Hunyuan-DiT was trained on ten shapes (diffusers' SUPPORTED_SHAPE, the official
ResolutionGroup). A real checkpoint (transformer `sample_size` 128, i.e. 1024 px) accepts
exactly those; a smaller test checkpoint gets the same ten scaled by sample_size/128 and
snapped to the 16-px grid (VAE 8 × patch 2), so one preset serves both. Sizes outside the
list are refused by the gateway rather than silently binned, which is why diffusers'
`use_resolution_binning` never changes a size we accept.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

SUPPORTED_SHAPES = (   # (width, height), in diffusers' order
    (1024, 1024), (1280, 1280), (1024, 768), (1152, 864), (1280, 960),
    (768, 1024), (864, 1152), (960, 1280), (1280, 768), (768, 1280),
)
NATIVE_SAMPLE_SIZE = 128   # latent side of the published checkpoints (1024 px)
GRID = 16                  # VAE factor 8 × patch 2
ROPE_BASE_PX = 512         # HunyuanDiTPipeline: base_size = 512 // 8 // patch_size


def supported_sizes(sample_size: int) -> tuple[str, ...]:
    """The ten shapes as 'WxH', scaled to a checkpoint whose latent side is `sample_size`."""
    scale = sample_size / NATIVE_SAMPLE_SIZE
    sizes = [f"{_snap(w * scale)}x{_snap(h * scale)}" for w, h in SUPPORTED_SHAPES]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sample_size {sample_size} is too small to keep the ten shapes apart: {sizes}")
    return tuple(sizes)


def scaled_size(size: str, sample_size: int) -> str:
    """A preset's 'WxH' (stated for the published checkpoints) on this checkpoint's scale."""
    return supported_sizes(sample_size)[[f"{w}x{h}" for w, h in SUPPORTED_SHAPES].index(size)]


def _snap(px: float) -> int:
    return max(GRID, int(round(px / GRID)) * GRID)


@lru_cache(maxsize=32)
def rotary_tables(width: int, height: int, head_dim: int, patch_size: int, vae_factor: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (h·w, head_dim), computed once per shape and device. Non-square grids
    are fitted into the 32 × 32 base grid, keeping their aspect, as the reference does."""
    grid = (height // vae_factor // patch_size, width // vae_factor // patch_size)
    base = ROPE_BASE_PX // 8 // patch_size
    region = get_resize_crop_region_for_grid(grid, base)
    return get_2d_rotary_pos_embed(head_dim, region, grid, device=device, output_type="pt")
