"""The parts of an official HunyuanDiT-*-Diffusers folder (transformer/ vae/ text_encoder/
text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/), checked and loaded from safetensors, and
the two stages around the sampling loop: text encoding and VAE decoding."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, HunyuanDiT2DModel
from transformers import BertModel, BertTokenizer, T5EncoderModel, T5Tokenizer

from rfserve.model_zoo.hunyuan_dit.text import TextEmbeddings
from rfserve.model_zoo.loading import CheckpointError, read_json, require, require_any, weights_name

BERT_TOKENS = 77    # HunyuanDiTPipeline.encode_prompt, text_encoder_index 0
T5_TOKENS = 256     # text_encoder_index 1


def _weight_files(stem: str, variant: str | None) -> list[str]:
    return list(dict.fromkeys([weights_name(stem, variant), f"{stem}.safetensors", f"{stem}.safetensors.index.json"]))


def check_hunyuan_folder(root: Path, variant: str | None = None) -> None:
    """Name the first missing or malformed file before any weight is read."""
    require(root, "model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
            "text_encoder_2/config.json", "scheduler/scheduler_config.json")
    for folder, stem in [("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "model"), ("text_encoder_2", "model")]:
        require_any(root, folder, _weight_files(stem, variant))
    require_any(root, "tokenizer", ["vocab.txt", "tokenizer.json"])
    require_any(root, "tokenizer_2", ["spiece.model", "tokenizer.json"])


def _load(cls, root: Path, subfolder: str, dtype_key: str, dtype, variant):
    """One component from safetensors; any loading failure becomes a one-line CheckpointError."""
    last = None
    for v in dict.fromkeys([variant, None]):
        try:
            return cls.from_pretrained(root / subfolder, use_safetensors=True, variant=v, **{dtype_key: dtype})
        except (OSError, EnvironmentError) as err:
            last = err
        except (ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(f"{root / subfolder}: {str(err).splitlines()[0]}") from None
    raise CheckpointError(f"{root / subfolder}: {str(last).splitlines()[0]}")


def _tokenizer(cls, folder: Path):
    try:
        return cls.from_pretrained(folder)
    except Exception as err:   # transformers raises many kinds (e.g. a spiece.model needing protobuf)
        raise CheckpointError(f"{folder}: {str(err).splitlines()[0]}") from None


@dataclass
class HunyuanComponents:
    transformer: HunyuanDiT2DModel
    vae: AutoencoderKL
    text_encoder: BertModel
    tokenizer: BertTokenizer
    text_encoder_2: T5EncoderModel
    tokenizer_2: T5Tokenizer
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    denoiser: Callable = field(init=False)   # the transformer, or its compiled twin (model_zoo.fast_path)

    def __post_init__(self) -> None:
        self.denoiser = self.transformer

    @classmethod
    def load(cls, root: Path, *, device="cpu", dtype=torch.float32, variant: str | None = None) -> "HunyuanComponents":
        check_hunyuan_folder(root, variant)
        parts = cls(
            transformer=_load(HunyuanDiT2DModel, root, "transformer", "torch_dtype", dtype, variant),
            vae=_load(AutoencoderKL, root, "vae", "torch_dtype", dtype, variant),
            text_encoder=_load(BertModel, root, "text_encoder", "dtype", dtype, variant),
            tokenizer=_tokenizer(BertTokenizer, root / "tokenizer"),
            text_encoder_2=_load(T5EncoderModel, root, "text_encoder_2", "dtype", dtype, variant),
            tokenizer_2=_tokenizer(T5Tokenizer, root / "tokenizer_2"),
            scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
            device=torch.device(device), dtype=dtype)
        return parts.to_device()

    def to_device(self) -> "HunyuanComponents":
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            module.to(self.device).eval().requires_grad_(False)
        return self

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def uses_style_and_size(self) -> bool:
        """True for v1.0/v1.1 checkpoints, False from v1.2 (transformer config)."""
        return bool(self.transformer.config.use_style_cond_and_image_meta_size)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> tuple[TextEmbeddings, list[bool]]:
        """Both encoders as HunyuanDiTPipeline.encode_prompt runs them: padded to 77 / 256
        tokens, attention masks passed in and returned (the transformer swaps masked positions
        for its learned padding). A prompt is flagged when either encoder cut it."""
        emb, masks, truncated = [], [], [False] * len(prompts)
        for tokenizer, encoder, length in [(self.tokenizer, self.text_encoder, BERT_TOKENS),
                                           (self.tokenizer_2, self.text_encoder_2, T5_TOKENS)]:
            tok = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_attention_mask=True, return_tensors="pt")
            full = [len(ids) for ids in tokenizer(prompts).input_ids]
            truncated = [was or n > length for was, n in zip(truncated, full)]
            mask = tok.attention_mask.to(self.device)
            emb.append(encoder(tok.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype))  # (B, L, D)
            masks.append(mask)
        return TextEmbeddings(emb[0], masks[0], emb[1], masks[1]), truncated

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W); HunyuanDiT uses no latent shift."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)
