"""The registry's entry for the `janusflow` family: the text-to-image pipeline (which also
carries the parts the chat route decodes with) and the card the gateway validates against.

SPEC option `?base=` names the VAE source when the checkpoint folder has no `vae/`
(default: `stabilityai/sdxl-vae`, as the official code loads)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rfserve.model_zoo.base import LoadedModel, ModelCard
from rfserve.model_zoo.janusflow.decoder import JanusFlowChat
from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline
from rfserve.model_zoo.presets import ModelSpec, Preset


def load_janusflow(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    pipe = JanusFlowPipeline.from_pretrained(root, device=device, dtype=dtype, base=spec.options.get("base"))
    return LoadedModel(janusflow_card(spec.preset, pipe), pipe, chat=JanusFlowChat(pipe.parts))


def janusflow_card(preset: Preset, pipe: JanusFlowPipeline) -> ModelCard:
    """One size: the checkpoint's native square (384² for JanusFlow-1.3B, smaller for test checkpoints)."""
    side, _ = pipe.default_size
    size = f"{side}x{side}"
    return ModelCard(name=preset.name, family=preset.family, defaults=replace(preset.defaults, size=size),
                     sizes=(size,), max_steps=preset.max_steps, max_prompt_tokens=pipe.max_prompt_tokens,
                     supports_negative_prompt=False)
