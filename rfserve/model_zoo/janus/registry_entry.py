"""The registry's entry for the `janus` family: the text-to-image pipeline, the chat parts (over the same
loaded model) and the card the gateway validates against.

SPEC option `?temperature=` overrides the preset's sampling temperature (1, the official default;
0 decodes greedily)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rfserve.model_zoo.base import LoadedModel, ModelCard
from rfserve.model_zoo.janus.chat import JanusChat
from rfserve.model_zoo.janus.pipeline import JanusPipeline
from rfserve.model_zoo.presets import ModelSpec, Preset


def load_janus(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    temperature = float(spec.options.get("temperature", spec.preset.options.get("temperature", 1.0)))
    pipe = JanusPipeline.from_pretrained(root, device=device, dtype=dtype, temperature=temperature)
    return LoadedModel(janus_card(spec.preset, pipe), pipe, chat=JanusChat(pipe.parts))


def janus_card(preset: Preset, pipe: JanusPipeline) -> ModelCard:
    """One size, the checkpoint's native square (384² for Janus-Pro). The G image tokens are fixed, so
    `num_inference_steps` has no meaning here: the card allows exactly 1 (its default), which the gateway
    validates like any other bound. Guidance is the CFG weight; there is no negative prompt."""
    side, _ = pipe.default_size
    size = f"{side}x{side}"
    return ModelCard(name=preset.name, family=preset.family, defaults=replace(preset.defaults, steps=1, size=size),
                     sizes=(size,), max_steps=1, max_prompt_tokens=pipe.max_prompt_tokens,
                     supports_negative_prompt=False)
