"""Writes and reads rf-shapes checkpoints in the InstaFlow (RectifiedFlowPipeline) folder layout."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import diffusers
import torch
from diffusers import PNDMScheduler

MODEL_INDEX = {
    "_class_name": "RectifiedFlowPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_pipeline(folder: Path, components: dict, dtype=torch.float16) -> None:
    """Save unet/vae/text_encoder (as `dtype` safetensors), tokenizer, scheduler and model_index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        copy.deepcopy(components[name]).to("cpu", dtype).save_pretrained(folder / name, safe_serialization=True)
    components["tokenizer"].save_pretrained(folder / "tokenizer")
    # Only init_noise_sigma (1.0 for PNDM) is read, as in the official 2-RF checkpoint.
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  skip_prk_steps=True).save_pretrained(folder / "scheduler")
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
