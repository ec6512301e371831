"""Architecture presets for Hunyuan-DiT checkpoints with random weights.

`v1.2` is the published architecture (transformer/config.json of HunyuanDiT-v1.2-Diffusers:
DiT-g/2, 40 layers, hidden 1408, 16 heads; BERT-large-sized bilingual CLIP; mT5-xl encoder;
SDXL VAE), used by the benchmark. `tiny` and `tiny-v1.1` keep every class, parameter name and
config key at toy widths for tests; `-v1.1` turns on the style and image-size conditioning
(`use_style_cond_and_image_meta_size`) and v1.1's `beta_end` 0.03. All are written in the
official diffusers layout with `save_pretrained`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

from rfserve.model_zoo.hunyuan_dit.vocab import train_t5_tokenizer, write_bert_vocab

# HF HunyuanDiT-v1.1-Diffusers/scheduler/scheduler_config.json (reference notes §4).
SCHEDULER_V11 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                     prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading",
                     variance_type="fixed_small", clip_sample=False)


@dataclass(frozen=True)
class HunyuanArchConfig:
    transformer: dict
    vae: dict
    bert: dict
    t5: dict
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_V11, beta_end=0.018))

    @classmethod
    def preset(cls, name: str) -> "HunyuanArchConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown Hunyuan-DiT arch preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]


_TINY = HunyuanArchConfig(
    transformer=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
                     activation_fn="gelu-approximate", sample_size=16, hidden_size=32, num_layers=4,
                     mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32, norm_type="layer_norm",
                     cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=77, text_len_t5=256,
                     use_style_cond_and_image_meta_size=False),
    # Four blocks: the VAE must downsample by 8, which the pipeline's RoPE grid assumes.
    vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
             sample_size=128, scaling_factor=0.13025,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=80),
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8),
)

PRESETS: dict[str, HunyuanArchConfig] = {
    "v1.2": HunyuanArchConfig(
        transformer=dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                         activation_fn="gelu-approximate", sample_size=128, hidden_size=1408, num_layers=40,
                         mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm",
                         cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                         use_style_cond_and_image_meta_size=False),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 sample_size=1024, scaling_factor=0.13025, force_upcast=False,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        # BERT-large widths (hfl/chinese-roberta-wwm-ext-large), with the published vocabulary: 47020 entries
        # (Tencent-Hunyuan/HunyuanDiT t2i/clip_text_encoder/config.json). The tiny test tokenizer's ids are all
        # below it, so a random checkpoint tokenizes with the tiny tokenizer but weighs what the real one weighs.
        bert=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  max_position_embeddings=512, vocab_size=47020),
        # mT5-xl encoder widths; mT5's vocabulary of 250112 entries (every mT5 config.json), as above.
        t5=dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                vocab_size=250112),
    ),
    "tiny": _TINY,
    "tiny-v1.1": replace(_TINY, transformer={**_TINY.transformer, "use_style_cond_and_image_meta_size": True},
                         scheduler=SCHEDULER_V11),
}


def build_random_hunyuan(cfg: HunyuanArchConfig, seed: int, scratch: Path, device="cpu",
                         dtype=torch.float32) -> dict:
    """The seven components diffusers' HunyuanDiTPipeline takes, random and in eval mode.
    `scratch` receives the BERT vocab.txt the tokenizer is read from."""
    torch.manual_seed(seed)
    tokenizer = write_bert_vocab(scratch)
    tokenizer_2 = train_t5_tokenizer()
    # The preset's vocabulary sizes the embedding tables (the published ones for v1.2); never below the tokenizer's.
    bert = BertConfig(**{**cfg.bert, "vocab_size": max(cfg.bert.get("vocab_size", 0), len(tokenizer))},
                      pad_token_id=tokenizer.pad_token_id)
    t5 = T5Config(**{**cfg.t5, "vocab_size": max(cfg.t5.get("vocab_size", 0), len(tokenizer_2))},
                  pad_token_id=tokenizer_2.pad_token_id,
                  eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id)
    with torch.device(device):
        models = dict(transformer=HunyuanDiT2DModel(**cfg.transformer), vae=AutoencoderKL(**cfg.vae),
                      text_encoder=BertModel(bert), text_encoder_2=T5EncoderModel(t5))
    for model in models.values():
        model.to(dtype).eval().requires_grad_(False)
    return dict(models, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=DDPMScheduler(**cfg.scheduler))


def save_random_hunyuan(path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the official HunyuanDiT-*-Diffusers layout.
    `tokenizer/` is left as published (vocab.txt + tokenizer_config.json); `tokenizer_2/` is
    saved by transformers (tokenizer.json), which needs no protobuf to read back."""
    parts = build_random_hunyuan(HunyuanArchConfig.preset(preset), seed, path / "vocab")
    pipe = HunyuanDiTPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.move(path / "vocab" / "vocab.txt", path / "tokenizer" / "vocab.txt")
    (path / "tokenizer" / "tokenizer.json").unlink()
    (path / "vocab").rmdir()
    return path
