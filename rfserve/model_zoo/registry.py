"""From a model SPEC (`NAME` or `NAME=PATH_OR_HUB_ID[?key=value&...]`) to a loaded
pipeline and the card the gateway validates requests against.

Each family registers one loader in `FAMILY_LOADERS`: `(spec, root, device, dtype) -> LoadedModel`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import torch

from rfserve.model_zoo.base import LoadedModel, ModelCard
from rfserve.model_zoo.hunyuan_dit import load_hunyuan
from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.janus import load_janus
from rfserve.model_zoo.janusflow import load_janusflow
from rfserve.model_zoo.loading import CheckpointError, resolve_source
from rfserve.model_zoo.perflow.pipeline import PeRFlowPipeline
from rfserve.model_zoo.perflow.scheduler import PREDICTION_TYPES
from rfserve.model_zoo.presets import PRESETS, ModelSpec, Preset
from rfserve.model_zoo.synthetic import load_synthetic

SPEC_OPTIONS = {"variant", "base", "prediction_type", "scheduler", "tiny_vae", "vae_tiling",
                "ms_per_image", "ms_per_batch", "sizes", "temperature"}


def parse_spec(text: str) -> ModelSpec:
    head, _, query = text.partition("?")             # the options may follow a bare NAME too
    name, _, source = head.partition("=")
    name = name.strip()
    if name not in PRESETS:
        raise CheckpointError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    options = dict(parse_qsl(query, keep_blank_values=False))
    unknown = set(options) - SPEC_OPTIONS
    if unknown:
        raise CheckpointError(f"unknown option(s) {sorted(unknown)} in --model {text}; known: {sorted(SPEC_OPTIONS)}")
    if options.get("prediction_type", "diff_eps") not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be one of {PREDICTION_TYPES}")
    return ModelSpec(name, source.strip() or PRESETS[name].source, options)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    root = resolve_source(spec.source) if spec.source else None      # None: the family needs no checkpoint
    return FAMILY_LOADERS[spec.preset.family](spec, root, device, dtype)


def _decoder_options(spec: ModelSpec) -> dict:
    tiny = spec.options.get("tiny_vae")
    return {"tiny_vae": resolve_source(tiny) if tiny else None,
            "vae_tiling": spec.options.get("vae_tiling", "0").lower() in ("1", "true", "yes")}


def _load_instaflow(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    pipe = InstaFlowPipeline.from_pretrained(root, device=device, dtype=dtype, variant=spec.options.get("variant"),
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
