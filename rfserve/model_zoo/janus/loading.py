"""Load a Janus / Janus-Pro checkpoint in the HF layout through transformers' own classes.

The folder holds config.json, the weights (model.safetensors, or model.safetensors.index.json and its
shards, as the 7B is published), tokenizer.json + tokenizer_config.json, the processor's config and
usually generation_config.json. `JanusForConditionalGeneration` and `JanusProcessor` load them; we check
the files first so that a missing one is one line naming it, and load weights from safetensors only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor

from rfserve import kernels
from rfserve.model_zoo.loading import CheckpointError, read_json, require

SINGLE_WEIGHTS, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass
class JanusParts:
    model: JanusForConditionalGeneration
    processor: JanusProcessor
    generation: GenerationConfig
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def image_side(self) -> int:
        """The VQ grid side times the decoder's upsampling (24 · 16 = 384 for Janus-Pro)."""
        vq = self.model.config.vq_config
        return vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def pad_id(self) -> int:
        """The unconditional rows' filler; the generation config's, as `generate()` uses."""
        pad = self.generation.pad_token_id
        return self.tokenizer.pad_token_id if pad is None else pad

    @property
    def keep_ids(self) -> tuple[int, int]:
        """The tokens an unconditional row keeps: BOS and BOI."""
        boi = (getattr(self.generation, "generation_kwargs", None) or {}).get("boi_token_id")
        if boi is None:
            boi = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        bos = self.generation.bos_token_id
        return (self.tokenizer.bos_token_id if bos is None else bos), boi

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def require_weights(root: Path) -> None:
    """The single file, or the shard index and every shard it names."""
    if (root / SINGLE_WEIGHTS).is_file():
        return
    if not (root / SHARD_INDEX).is_file():
        raise CheckpointError(f"missing file: {root / SINGLE_WEIGHTS} (weights load from safetensors only)")
    shards = sorted(set(read_json(root / SHARD_INDEX).get("weight_map", {}).values()))
    if not shards:
        raise CheckpointError(f"malformed file: {root / SHARD_INDEX}: no weight_map")
    require(root, *shards)


def load_parts(root: Path, *, device="cpu", dtype=torch.float32) -> JanusParts:
    device = torch.device(device)
    require(root, "config.json", "tokenizer.json", "tokenizer_config.json")
    require_weights(root)
    if not any((root / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise CheckpointError(f"missing file: {root / 'processor_config.json'}")
    try:
        processor = JanusProcessor.from_pretrained(root)
        # The SigLIP tower's attention through the kernel dispatcher (SDPA is its twin); the language model runs
        # in our own `run_layers`, which never reads this setting.
        attention = kernels.register_transformers_attention()
        model = JanusForConditionalGeneration.from_pretrained(root, dtype=dtype, use_safetensors=True,
                                                              attn_implementation=attention)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{root}: cannot load the Janus checkpoint: {str(err).splitlines()[0]}") from None
    generation = model.generation_config
    return JanusParts(model.to(device).eval().requires_grad_(False), processor, generation, device, dtype)
