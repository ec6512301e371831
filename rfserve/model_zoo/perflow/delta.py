"""PeRFlow's ΔW checkpoints: a UNet-shaped file of weight differences to add onto a
Stable Diffusion 1.5 UNet (W = W_base + ΔW, key for key)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from rfserve.model_zoo.loading import CheckpointError, require

DELTA_STEM = "diffusion_pytorch_model"


def is_delta_folder(root: Path) -> bool:
    """A ΔW release is a bare UNet folder (config.json + weights), not a pipeline."""
    return (root / "config.json").is_file() and not (root / "model_index.json").is_file()


def delta_variant(root: Path, variant: str | None) -> str | None:
    """The variant to read; inferred when the folder holds exactly one weights file."""
    if variant:
        return variant
    found = sorted(root.glob(f"{DELTA_STEM}*.safetensors"))
    if not found:
        raise CheckpointError(f"missing file: {root / (DELTA_STEM + '.safetensors')}")
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CheckpointError(f"{root}: several ΔW files ({names}); pick one with ?variant=")
    parts = found[0].name.split(".")
    return parts[1] if len(parts) == 3 else None


@torch.no_grad()
def merge_delta(unet: UNet2DConditionModel, root: Path, variant: str | None) -> UNet2DConditionModel:
    require(root, "config.json")
    variant = delta_variant(root, variant)
    delta = UNet2DConditionModel.from_pretrained(root, variant=variant, use_safetensors=True,
                                                 torch_dtype=torch.float32).state_dict()
    base = unet.state_dict()
    if delta.keys() != base.keys():
        missing = sorted(set(base) ^ set(delta))[:3]
        raise CheckpointError(f"{root}: ΔW keys do not match the base UNet (e.g. {missing})")
    for name, param in base.items():
        param.copy_((param.float() + delta[name].to(param.device)).to(param.dtype))
    return unet
