"""JanusFlow configuration, read from and written to the official `config.json` layout.

The official file (`MultiModalityConfig`, model_type "multi_modality") holds four sub-configs,
each `{"cls": <class name>, "params": {...}}` except `language_config`, which is a plain
LlamaConfig dict. The official classes take their constructor defaults for any missing param,
so every field below defaults to the official class default, not to the JanusFlow-1.3B value.

The SigLIP tower is named, not described: `model_name` selects an architecture from a table
(`SIGLIP_ARCHS`, the facts of the official `SigLIP_MODEL_CONFIG`). The `tiny` test preset adds a
small entry of its own so that the layout, the keys and the code paths stay the official ones.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields

from transformers import LlamaConfig


@dataclass(frozen=True)
class SigLIPArch:
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_ratio: float


SIGLIP_ARCHS = {
    "siglip_large_patch16_384": SigLIPArch(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0),
    "siglip_large_patch16_256": SigLIPArch(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0),
    "rfserve_siglip_tiny": SigLIPArch(width=16, layers=2, heads=2, patch_size=4, mlp_ratio=2.0),
}


@dataclass(frozen=True)
class UnderstandingConfig:
    """`vision_und_enc_config.params` (CLIPVisionTower)."""
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 336
    select_layer: int = -2
    pixel_mean: tuple[float, ...] | None = None   # optional normalisation inside the tower
    pixel_std: tuple[float, ...] | None = None

    @property
    def arch(self) -> SigLIPArch:
        return SIGLIP_ARCHS[self.model_name]

    @property
    def depth(self) -> int:
        """The official tower is truncated at `select_layer` (≤ 0 counts from the end)."""
        n = self.arch.layers
        return min(n, n + self.select_layer + 1) if self.select_layer <= 0 else min(n, self.select_layer)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.arch.patch_size) ** 2


@dataclass(frozen=True)
class GenEncoderConfig:
    """`vision_gen_enc_config.params` (ShallowUViTEncoder)."""
    input_channels: int = 3
    stride: int = 4
    kernel_size: int = 7
    padding: int | None = None
    block_out_channels: tuple[int, ...] = (768,)
    layers_in_middle: int = 2
    hidden_size: int = 2048
    use_bias: bool = True
    norm_eps: float = 1e-6
    use_mid_block: bool = True


@dataclass(frozen=True)
class GenDecoderConfig:
    """`vision_gen_dec_config.params` (ShallowUViTDecoder)."""
    in_channels: int = 768
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (768,)
    upsamples: int = 2
    layers_in_middle: int = 2
    hidden_size: int = 2048
    norm_eps: float = 1e-6
    use_bias: bool = True
    use_mid_block: bool = True


def _params(cls, params: dict):
    """Known params as typed fields; unknown official params (dropout, elementwise_affine, ckpt_path,
    select_feature, ...) do not change inference and are ignored."""
    names = {f.name for f in fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    return cls(**kept)


@dataclass(frozen=True)
class JanusFlowConfig:
    understanding: UnderstandingConfig
    gen_encoder: GenEncoderConfig
    gen_decoder: GenDecoderConfig
    language: LlamaConfig
    raw: dict                                  # the config.json dict, kept to write it back unchanged

    @classmethod
    def from_dict(cls, d: dict) -> "JanusFlowConfig":
        for key in ("vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config", "language_config"):
            if key not in d:
                raise ValueError(f"config.json has no {key!r}")
        expected = {"vision_und_enc_config": "CLIPVisionTower", "vision_gen_enc_config": "ShallowUViTEncoder",
                    "vision_gen_dec_config": "ShallowUViTDecoder"}
        for key, name in expected.items():
            if name not in d[key].get("cls", ""):
                raise ValueError(f"config.json {key}.cls must name {name}, got {d[key].get('cls')!r}")
        und = _params(UnderstandingConfig, d["vision_und_enc_config"].get("params", {}))
        if und.model_name not in SIGLIP_ARCHS:
            raise ValueError(f"unknown SigLIP model_name {und.model_name!r}; known: {sorted(SIGLIP_ARCHS)}")
        return cls(und, _params(GenEncoderConfig, d["vision_gen_enc_config"].get("params", {})),
                   _params(GenDecoderConfig, d["vision_gen_dec_config"].get("params", {})),
                   LlamaConfig(**d["language_config"]), copy.deepcopy(d))

    @property
    def hidden_size(self) -> int:
        return self.language.hidden_size


def _official(und: dict, enc: dict, dec: dict, language: dict) -> dict:
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "torch_dtype": "bfloat16",
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": und},
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc", "params": enc},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec", "params": dec},
        "language_config": language,
    }


def preset(name: str, vocab_size: int | None = None) -> dict:
    """An official-layout config.json dict. `janusflow-1.3b` mirrors the published architecture
    (SigLIP-L/16@384, DeepSeek-LLM-1.3B, 4x48x48 latents as 24x24 tokens) for random-weight
    benchmarks; loading a real checkpoint always uses that checkpoint's own config.json."""
    if name == "janusflow-1.3b":
        return _official(
            {"model_name": "siglip_large_patch16_384", "image_size": 384, "select_feature": "same",
             "select_layer": -1},
            {"input_channels": 4, "stride": 2, "kernel_size": 2, "block_out_channels": [768],
             "layers_in_middle": 2, "hidden_size": 2048, "use_bias": True, "norm_eps": 1e-6},
            {"in_channels": 768, "out_channels": 4, "block_out_channels": [768], "upsamples": 1,
             "layers_in_middle": 2, "hidden_size": 2048, "use_bias": True, "norm_eps": 1e-6},
            {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab_size or 102400,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
    if name == "tiny":
        return _official(
            {"model_name": "rfserve_siglip_tiny", "image_size": 16, "select_feature": "same", "select_layer": -1},
            {"input_channels": 4, "stride": 2, "kernel_size": 2, "block_out_channels": [12],
             "layers_in_middle": 1, "hidden_size": 32, "use_bias": True, "norm_eps": 1e-6},
            {"in_channels": 12, "out_channels": 4, "block_out_channels": [12], "upsamples": 1,
             "layers_in_middle": 1, "hidden_size": 32, "use_bias": True, "norm_eps": 1e-6},
            {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size or 512,
             "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.2,
             "tie_word_embeddings": False, "torch_dtype": "float32"})
    raise KeyError(f"unknown JanusFlow preset {name!r}; known: janusflow-1.3b, tiny")
