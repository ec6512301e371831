"""The registry's entry for the `hunyuan-dit` family: pipeline plus the card the gateway
validates against (the ten trained shapes, scaled for small test checkpoints)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rfserve.model_zoo.base import LoadedModel, ModelCard
from rfserve.model_zoo.hunyuan_dit.components import BERT_TOKENS
from rfserve.model_zoo.hunyuan_dit.geometry import scaled_size, supported_sizes
from rfserve.model_zoo.hunyuan_dit.pipeline import HunyuanPipeline
from rfserve.model_zoo.presets import ModelSpec, Preset


def load_hunyuan(spec: ModelSpec, root: Path, device, dtype) -> LoadedModel:
    pipe = HunyuanPipeline.from_pretrained(root, device=device, dtype=dtype, variant=spec.options.get("variant"),
                                           scheduler=spec.options.get("scheduler"))
    return LoadedModel(hunyuan_card(spec.preset, pipe), pipe)


def hunyuan_card(preset: Preset, pipe: HunyuanPipeline) -> ModelCard:
    """`max_prompt_tokens` is BERT's 77, the tighter of the two encoders (mT5 reads 256)."""
    sample_size = pipe.parts.transformer.config.sample_size  # type: ignore[attr-defined]  # set at run time
    defaults = replace(preset.defaults, size=scaled_size(preset.defaults.size, sample_size))
    return ModelCard(name=preset.name, family=preset.family, defaults=defaults, sizes=supported_sizes(sample_size),
                     max_steps=preset.max_steps, max_prompt_tokens=BERT_TOKENS,
                     supports_edits=True)
