"""From a model SPEC (`NAME` or `NAME=PATH_OR_HUB_ID[?key=value&...]`) to a loaded
pipeline and the card the gateway validates requests against.

Each family registers one loader in `FAMILY_LOADERS`: `(spec, root, device, dtype) -> LoadedModel`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from rfserve.model_zoo.base import LoadedModel, ModelCard
from rfserve.model_zoo.hunyuan_dit import load_hunyuan
from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.janus import load_janus
from rfserve.model_zoo.janusflow import load_janusflow
from rfserve.model_zoo.loading import resolve_source
from rfserve.model_zoo.perflow.pipeline import PeRFlowPipeline
from rfserve.model_zoo.presets import ModelSpec, Preset
from rfserve.model_zoo.presets import parse_spec as parse_spec      # re-exported: what callers load, they parse
from rfserve.model_zoo.synthetic import load_synthetic


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, root: Path | None = None) -> LoadedModel:
    """`root`: the source already resolved (server.sources, before the model libraries were imported)."""
    if root is None and spec.source:
        root = resolve_source(spec.source)      # still None: the family needs no checkpoint
    return FAMILY_LOADERS[spec.preset.family](spec, root, device, dtype)


def _decoder_options(spec: ModelSpec) -> dict:
    tiny = spec.options.get("tiny_vae")
    return {"tiny_vae": resolve_source(tiny) if tiny else None,
            "vae_tiling": spec.options.get("vae_tiling", "0").lower() in ("1", "true", "yes")}


def _load_instaflow(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    """`?count_guidance=`: the scale of the count guide the folder ships (rf-shapes-2rf's), 0 for none."""
    scale = spec.options.get("count_guidance")
    pipe = InstaFlowPipeline.from_pretrained(root, device=device, dtype=dtype, variant=spec.options.get("variant"),
                                             count_guidance=None if scale is None else float(scale),
                                             **_decoder_options(spec))
    return LoadedModel(sd_card(spec.preset, pipe), pipe)


def _load_perflow(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    kind = spec.options.get("prediction_type", spec.preset.options.get("prediction_type", "diff_eps"))
    pipe = PeRFlowPipeline.from_pretrained(root, device=device, dtype=dtype, variant=spec.options.get("variant"),
                                           base=spec.options.get("base"), prediction_type=kind,
                                           **_decoder_options(spec))
    return LoadedModel(sd_card(spec.preset, pipe), pipe)


FAMILY_LOADERS: dict[str, Callable[..., LoadedModel]] = {
    "instaflow": _load_instaflow,
    "perflow": _load_perflow,
    "janusflow": load_janusflow,
    "janus": load_janus,
    "hunyuan-dit": load_hunyuan,
    "synthetic": load_synthetic,
}


def sd_card(preset: Preset, pipe) -> ModelCard:
    """Sizes are the preset's factors of the checkpoint's native side, so a tiny test
    checkpoint gets tiny sizes under the same preset."""
    native, _ = pipe.default_size
    step = 8 * pipe.parts.vae_scale_factor
    sizes = tuple(dict.fromkeys(
        f"{_snap(native * fw, step)}x{_snap(native * fh, step)}" for fw, fh in preset.size_factors))
    defaults = preset.defaults
    if defaults.size not in sizes:
        defaults = replace(defaults, size=sizes[0])
    return ModelCard(name=preset.name, family=preset.family, defaults=defaults, sizes=sizes,
                     max_steps=preset.max_steps, max_prompt_tokens=pipe.parts.max_tokens, supports_edits=True,
                     vocabulary=preset.vocabulary)


def _snap(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)
