"""Builds the three networks in the InstaFlow checkpoint layout (diffusers/transformers classes)."""
from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .config import ModelConfig
from .data import IMAGE_SIZE


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.vae_norm_groups,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False)


def latent_size(cfg: ModelConfig) -> int:
    return IMAGE_SIZE // 2 ** (len(cfg.vae_channels) - 1)


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """No attention at the full latent resolution (cost); cross-attention on the coarser levels.

    Every caption attribute is global (one colour, kind and count per image), so the pooled caption also enters
    the time embedding, which scales and shifts every ResNet block, the finest level included."""
    levels = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size(cfg), in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_groups, addition_embed_type="text",
        addition_embed_type_num_heads=cfg.text_heads, resnet_time_scale_shift="scale_shift")


def build_text_encoder(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=cfg.text_width,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
