"""The count guide in a checkpoint folder (issue #35): the classifier saved beside the 2-RF weights and read back
by the serving pipeline, which steers each row towards the count its prompt asks for (`data.asked_count`).

Why a folder of its own: the guide is the sampler's, not the UNet's. A checkpoint without `count_guide/` (every
official InstaFlow one) samples exactly as before, and the diffusers loaders, which read only the folders
`model_index.json` names, ignore it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rfserve.model_zoo.loading import CheckpointError, describe, read_json, require

from .counter import MAX_COUNT, CountClassifier, CountGuide

GUIDE_FOLDER = "count_guide"


def save_count_guide(folder: Path, guide: CountGuide, dtype=torch.float16) -> None:
    """`folder`/count_guide/: config.json (the classifier's sizes and the guide's scale) and model.safetensors."""
    path = Path(folder) / GUIDE_FOLDER
    path.mkdir(parents=True, exist_ok=True)
    inp = guide.classifier.inp
    config = {"latent_channels": inp.in_channels, "width": inp.out_channels, "classes": MAX_COUNT + 1,
              "scale": guide.scale}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in guide.classifier.state_dict().items()},
              path / "model.safetensors")


def load_count_guide(folder: Path, scale: float | None = None, device="cpu") -> CountGuide | None:
    """The guide a checkpoint folder ships, at its own scale or at `scale`; None where it ships none or the scale
    is 0 (`?count_guidance=0` samples as the UNet alone does)."""
    path = Path(folder) / GUIDE_FOLDER
    if not (path / "config.json").exists():
        return None
    require(path, "model.safetensors")
    config = read_json(path / "config.json")
    missing = sorted({"latent_channels", "width", "classes", "scale"} - set(config))
    if missing:
        raise CheckpointError(f"malformed file: {path / 'config.json'}: missing {', '.join(missing)}")
    scale = float(config["scale"] if scale is None else scale)
    if scale == 0:
        return None
    if config["classes"] != MAX_COUNT + 1:
        raise CheckpointError(f"{path}: a count guide of {config['classes']} classes; this server reads "
                              f"{MAX_COUNT + 1} (0 to {MAX_COUNT} shapes)")
    classifier = CountClassifier(config["latent_channels"], config["width"])
    try:
        classifier.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    except Exception as err:  # a truncated file (SafetensorError) or other shapes (RuntimeError)
        raise CheckpointError(f"{path / 'model.safetensors'}: {describe(err)}") from None
    return CountGuide(classifier.to(device), scale)
