"""Architecture presets for SD1.5-layout checkpoints with random weights.

`sd15` is the real InstaFlow/PeRFlow architecture (for benchmarks when no checkpoint is
given); `tiny` keeps the same classes and config keys at toy widths for tests. Both are
written in the official diffusers folder layout with `save_pretrained`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass(frozen=True)
class SDArchConfig:
    unet: dict
    vae: dict
    text: dict
    max_tokens: int = 77
    merges: tuple[str, ...] = ("t h", "th e</w>", "a n", "an d</w>", "o n</w>", "r e", "c a")

    @classmethod
    def preset(cls, name: str) -> "SDArchConfig":
        return PRESETS[name]


PRESETS: dict[str, SDArchConfig] = {
    "sd15": SDArchConfig(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 sample_size=512, scaling_factor=0.18215,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    ),
    "tiny": SDArchConfig(
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
                 norm_num_groups=32, scaling_factor=0.18215,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
    ),
}


def _byte_unicode() -> list[str]:
    """GPT-2's reversible byte→unicode table, which CLIP's BPE vocabulary is built on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return [chr(c) for c in printable + shifted]


def write_clip_tokenizer(folder: Path, cfg: SDArchConfig) -> CLIPTokenizer:
    """A real CLIPTokenizer over a byte-level vocabulary with a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in cfg.merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(cfg.merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=cfg.max_tokens)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    return tok


@dataclass
class RandomSD:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: PNDMScheduler = field(default_factory=lambda: PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        skip_prk_steps=True, set_alpha_to_one=False))


def build_random_sd(cfg: SDArchConfig, seed: int, scratch: Path) -> RandomSD:
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(scratch, cfg)
    vocab = max(cfg.text.get("vocab_size", 0), len(tokenizer))
    text_cfg = CLIPTextConfig(**{**cfg.text, "vocab_size": vocab}, max_position_embeddings=cfg.max_tokens,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    return RandomSD(UNet2DConditionModel(**cfg.unet), AutoencoderKL(**cfg.vae),
                    CLIPTextModel(text_cfg).eval(), tokenizer)


def save_random_sd(path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the official SD1.5 diffusers layout."""
    parts = build_random_sd(SDArchConfig.preset(preset), seed, path / "tokenizer")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
