"""Named presets: which pipeline family serves a name, where its weights live by
default, its generation defaults, and the sizes it accepts; and the `--model` SPEC that names one.

The SPEC is parsed here, beside the presets, and not in the registry: the registry imports every family
(seconds of diffusers and transformers), and the CLI refuses an unknown preset or option before that."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from rfserve.model_zoo.base import ImageDefaults, Vocabulary
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.rf_shapes.presets import CHECKPOINT_DIR, RF_SHAPES_DEFAULTS
from rfserve.model_zoo.rf_shapes.vocabulary import VOCABULARY as RF_SHAPES_VOCABULARY

SD_SIZE_FACTORS = ((1.0, 1.0), (1.0, 1.5), (1.5, 1.0), (1.5, 1.5))   # (w, h) × native side
# The families whose loader also returns chat parts (`LoadedModel.chat`): what `rfserve serve -h` lists as chatting.
CHAT_FAMILIES = frozenset({"janusflow", "janus"})
# PeRFlow's parameterisations (model_zoo.perflow.scheduler), which `?prediction_type=` may name.
PREDICTION_TYPES = ("ddim_eps", "diff_eps", "velocity")
SPEC_OPTIONS = {"variant", "base", "prediction_type", "scheduler", "tiny_vae", "vae_tiling",
                "ms_per_image", "ms_per_batch", "sizes", "temperature", "count_guidance"}
PERFLOW_NEGATIVE = ("distorted, blur, smooth, low-quality, warm, haze, over-saturated, "
                    "high-contrast, out of focus, dark")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str                       # instaflow | perflow | hunyuan-dit
    source: str                       # local folder or hub id; "" for a family that needs no checkpoint
    defaults: ImageDefaults
    size_factors: tuple[tuple[float, float], ...] = SD_SIZE_FACTORS
    max_steps: int = 100
    options: dict = field(default_factory=dict)
    vocabulary: Vocabulary | None = None      # the caption words a closed-grammar model was trained on

    @property
    def chats(self) -> bool:
        return self.family in CHAT_FAMILIES


def _rf_shapes(name: str) -> Preset:
    d = RF_SHAPES_DEFAULTS[name]
    return Preset(name, "instaflow", str(CHECKPOINT_DIR / name),
                  ImageDefaults(d["steps"], d["guidance"], d.get("negative_prompt", ""), d["size"]),
                  size_factors=((1.0, 1.0),), max_steps=50, vocabulary=RF_SHAPES_VOCABULARY)


PRESETS: dict[str, Preset] = {
    p.name: p for p in [
        _rf_shapes("rf-shapes"),
        _rf_shapes("rf-shapes-2rf"),
        Preset("instaflow-0.9b", "instaflow", "XCLiu/instaflow_0_9B_from_sd_1_5",
               ImageDefaults(steps=1, guidance=0.0)),
        Preset("instaflow-2rf", "instaflow", "XCLiu/2_rectified_flow_from_sd_1_5",
               ImageDefaults(steps=25, guidance=1.5, negative_prompt="painting, unreal, twisted")),
        Preset("perflow-sd15", "perflow", "hansyan/perflow-sd15-dreamshaper",
               ImageDefaults(steps=4, guidance=4.5, negative_prompt=PERFLOW_NEGATIVE),
               options={"prediction_type": "diff_eps"}),
        # Hunyuan-DiT: sizes come from model_zoo.hunyuan_dit.geometry (the ten trained shapes);
        # sampler: the checkpoint's DDPM unless ?scheduler=ddim|dpm.
        Preset("hunyuan-dit-v1.2", "hunyuan-dit", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers",
               ImageDefaults(steps=50, guidance=5.0, size="1024x1024")),
        Preset("hunyuan-dit-v1.2-distilled", "hunyuan-dit", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers-Distilled",
               ImageDefaults(steps=25, guidance=5.0, size="1024x1024")),
        # JanusFlow: one native square size from the checkpoint (384² for the 1.3B); CFG weight w = 2.
        Preset("janusflow-1.3b", "janusflow", "deepseek-ai/JanusFlow-1.3B",
               ImageDefaults(steps=30, guidance=2.0, size="384x384"), size_factors=((1.0, 1.0),)),
        # Janus-Pro: 576 VQ tokens generated autoregressively, decoded to 384² (the checkpoint's native square).
        # Official defaults: CFG weight 5, temperature 1 (sampling). The token count is fixed, so steps is 1.
        Preset("janus-pro-1b", "janus", "deepseek-community/Janus-Pro-1B",
               ImageDefaults(steps=1, guidance=5.0, size="384x384"), size_factors=((1.0, 1.0),), max_steps=1,
               options={"temperature": 1.0}),
        Preset("janus-pro-7b", "janus", "deepseek-community/Janus-Pro-7B",
               ImageDefaults(steps=1, guidance=5.0, size="384x384"), size_factors=((1.0, 1.0),), max_steps=1,
               options={"temperature": 1.0}),
        # Benchmarks only: paced photographs (model_zoo/synthetic). No source: it needs no checkpoint.
        Preset("synthetic", "synthetic", "", ImageDefaults(steps=1, guidance=0.0), max_steps=1),
    ]
}


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` SPEC, parsed: the preset's name, where its weights are, and the `?` options."""
    name: str
    source: str
    options: dict

    @property
    def preset(self) -> Preset:
        return PRESETS[self.name]


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
    if "count_guidance" in options:
        try:
            ok = float(options["count_guidance"]) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise CheckpointError(f"--model {text}: ?count_guidance must be a number ≥ 0 (0 turns the count guide off)")
    return ModelSpec(name, source.strip() or PRESETS[name].source, options)
