"""The Stable-Diffusion-1.5 parts shared by InstaFlow, PeRFlow and rf-shapes:
a diffusers folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from rfserve.model_zoo.loading import CheckpointError, describe, read_json, require, require_any, weights_name

TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json", "vocab.json"]


def check_sd_folder(root: Path, variant: str | None = None, *, need_unet: bool = True) -> None:
    """Name the first missing or malformed file before any weight is read."""
    require(root, "model_index.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json")
    if need_unet:
        require(root, "unet/config.json")
        require_any(root, "unet", [weights_name("diffusion_pytorch_model", variant),
                                   "diffusion_pytorch_model.safetensors"])
    require_any(root, "vae", [weights_name("diffusion_pytorch_model", variant),
                              "diffusion_pytorch_model.safetensors"])
    require_any(root, "text_encoder", [weights_name("model", variant), "model.safetensors"])
    require_any(root, "tokenizer", TOKENIZER_FILES)


def load_unet(root: Path, subfolder: str | None, *, dtype, variant=None) -> UNet2DConditionModel:
    return _load(UNet2DConditionModel, root, subfolder, dtype=dtype, variant=variant)


def _load(cls, root: Path, subfolder: str | None, *, dtype, variant=None):
    """One component, falling back from a missing weights variant to the plain weights. Whatever else fails
    (a config field of the wrong type raises a TypeError deep in torch) is named with the component's folder."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    for v in dict.fromkeys([variant, None]):
        try:
            return cls.from_pretrained(root, torch_dtype=dtype, use_safetensors=True, variant=v, **kwargs)
        except OSError as err:
            last = err
        except Exception as err:
            raise CheckpointError(f"{root / (subfolder or '')}: {describe(err)}") from err
    raise CheckpointError(f"{root / (subfolder or '')}: {str(last).splitlines()[0]}")


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int = 8           # from the checkpoint's own VAE, even when a tiny VAE decodes
    # The hot calls, which the fast path swaps for compiled ones (model_zoo.fast_path).
    denoiser: Callable = field(init=False)          # the UNet
    vae_decode: Callable = field(init=False)        # the VAE's decode

    def __post_init__(self) -> None:
        self.denoiser, self.vae_decode = self.unet, self.vae.decode

    @classmethod
    def load(cls, root: Path, *, device="cpu", dtype=torch.float32, variant=None,
             unet: UNet2DConditionModel | None = None, tiny_vae: Path | None = None,
             vae_tiling: bool = False) -> "SDComponents":
        """`tiny_vae`: an AutoencoderTiny folder (e.g. TAESD) that decodes instead of the
        full VAE; `vae_tiling`: decode large images tile by tile to bound memory."""
        check_sd_folder(root, variant, need_unet=unet is None)
        unet = unet if unet is not None else load_unet(root, "unet", dtype=dtype, variant=variant)
        if tiny_vae is not None:
            require(tiny_vae, "config.json")
            vae = _load(AutoencoderTiny, tiny_vae, None, dtype=dtype)
        else:
            vae = _load(AutoencoderKL, root, "vae", dtype=dtype, variant=variant)
        if vae_tiling:
            vae.enable_tiling()
        scale = 2 ** (len(read_json(root / "vae" / "config.json")["block_out_channels"]) - 1)
        text_encoder = _load(CLIPTextModel, root, "text_encoder", dtype=dtype, variant=variant)
        try:
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{root / 'tokenizer'}: {str(err).splitlines()[0]}") from None
        parts = cls(unet.to(device), vae.to(device), text_encoder.to(device),
                    tokenizer, read_json(root / "scheduler" / "scheduler_config.json"),
                    torch.device(device), dtype, scale)
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.eval().requires_grad_(False)
        return parts

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """CLIP last hidden state as SD pipelines compute it; over-long prompts are
        truncated to the tokenizer's limit and flagged."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens,
                             truncation=True, return_tensors="pt")
        full_lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        truncated = [n > self.max_tokens for n in full_lengths]
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        emb = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return emb.to(self.dtype), truncated   # (B, L, D)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), float."""
        image = self.vae_decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor | None]:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded as diffusers' image processor does, on the host;
    and on CUDA the same pixels left on the device (else None), which the worker can encode there as JPEG.
    On CUDA the bytes come back through pinned memory in one copy."""
    pixels = (images.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    if not pixels.is_cuda:
        return pixels.numpy(), None
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    torch.cuda.current_stream(pixels.device).synchronize()
    return host.numpy(), pixels
