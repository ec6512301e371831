"""Load a JanusFlow checkpoint folder as published: `config.json`, `model.safetensors`,
`tokenizer.json` (+ `tokenizer_config.json`), `preprocessor_config.json`; and the SDXL VAE.

The VAE is not part of the JanusFlow repository; the official code loads `stabilityai/sdxl-vae`.
It comes from, in order: a `vae/` subfolder of the checkpoint, the `?base=` SPEC option (a
folder or hub id holding an AutoencoderKL), or the hub id `stabilityai/sdxl-vae` (which must be
in the HF cache when offline). Weights are safetensors only; every failure is one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file

from rfserve.model_zoo.janusflow.config import JanusFlowConfig
from rfserve.model_zoo.janusflow.model import MultiModalityCausalLM
from rfserve.model_zoo.janusflow.processor import JanusFlowProcessor
from rfserve.model_zoo.loading import CheckpointError, read_json, require, resolve_source

DEFAULT_VAE = "stabilityai/sdxl-vae"
# The official SigLIP tower is built with global_pool="map", so its attention-pooling head is
# saved, but `ignore_head=True` means it never runs. These keys are dropped, not renamed.
UNUSED_OFFICIAL_KEYS = ("vision_und_enc_model.vision_tower.attn_pool.",)


@dataclass
class JanusFlowParts:
    config: JanusFlowConfig
    model: MultiModalityCausalLM
    processor: JanusFlowProcessor
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_side(self) -> int:
        """Generated images are square at the understanding encoder's size (384 for JanusFlow-1.3B)."""
        return self.config.understanding.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_side // self.vae_scale_factor
        return (self.config.gen_encoder.input_channels, side, side)

    @property
    def num_gen_tokens(self) -> int:
        return (self.latent_shape[1] // self.config.gen_encoder.stride) ** 2

    @property
    def context_length(self) -> int:
        return self.config.language.max_position_embeddings

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_model(cfg: JanusFlowConfig, device, dtype) -> MultiModalityCausalLM:
    """Module tree without a random init (weights come next), with the rotary tables rebuilt.
    They are cast to `dtype` as the official `model.to(torch.bfloat16)` casts them."""
    with torch.device("meta"):
        model = MultiModalityCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    rotary = type(model.language_model.model.rotary_emb)(config=cfg.language)
    model.language_model.model.rotary_emb = rotary.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_state(model: MultiModalityCausalLM, weights: Path) -> None:
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"malformed file: {weights}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_OFFICIAL_KEYS)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: {len(missing)} missing key(s) {missing[:3]}, "
                              f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    bad = next((k for k in own if own[k].shape != state[k].shape), None)
    if bad is not None:
        raise CheckpointError(f"{weights}: {bad} has shape {tuple(state[bad].shape)}, "
                              f"config.json implies {tuple(own[bad].shape)}")
    model.load_state_dict(state, strict=True)


def resolve_vae(root: Path, base: str | None) -> Path:
    if (root / "vae").is_dir():
        return root / "vae"
    source = resolve_source(base or DEFAULT_VAE)
    return source / "vae" if (source / "vae").is_dir() else source


def load_vae(folder: Path, device, dtype) -> AutoencoderKL:
    """The reference decodes in bf16 and notes the SDXL VAE fails in fp16, so fp16 becomes bf16."""
    require(folder, "config.json")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise CheckpointError(f"missing file: {folder / 'diffusion_pytorch_model.safetensors'}")
    vae_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, torch_dtype=vae_dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        raise CheckpointError(f"{folder}: cannot load the VAE: {str(err).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def load_parts(root: Path, *, device="cpu", dtype=torch.float32, base: str | None = None) -> JanusFlowParts:
    device = torch.device(device)
    require(root, "config.json")
    if not (root / "model.safetensors").is_file():
        raise CheckpointError(f"missing file: {root / 'model.safetensors'} (weights load from safetensors only)")
    try:
        cfg = JanusFlowConfig.from_dict(read_json(root / "config.json"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"malformed file: {root / 'config.json'}: {err}") from None
    processor = JanusFlowProcessor.load(root, num_image_tokens=cfg.understanding.num_tokens)
    model = build_model(cfg, device, dtype)
    load_state(model, root / "model.safetensors")
    vae = load_vae(resolve_vae(root, base), device, dtype)
    return JanusFlowParts(cfg, model, processor, vae, device, dtype)
