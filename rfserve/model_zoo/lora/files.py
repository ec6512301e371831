"""LoRA files in the formats users have, read into per-layer A, B and scale with diffusers' own converters.

diffusers (0.42) reads a LoRA in two steps, and this module runs the same steps without touching a model:
`StableDiffusionLoraLoaderMixin.lora_state_dict` fetches the file (a path, a folder or a hub id) and converts
kohya/A1111 keys (`lora_unet_…`, `lora_te_…`, `.alpha`) to diffusers' own; then the UNet path
(`PeftAdapterMixin.load_lora_adapter`) converts to peft keys with `convert_unet_state_dict_to_peft` and the text
encoder path (`_load_lora_into_text_encoder`) with `convert_state_dict_to_peft` (applied here so that files mixing
key styles convert whole, see `_convert`), and both build the adapter's `LoraConfig` (rank and alpha per layer,
from the file's `.alpha` keys or its saved metadata) with `_create_lora_config`. Each layer's scale is then what
peft gives it: alpha / r (alpha / √r with rsLoRA), 1.0 when the file has neither alphas nor metadata.

diffusers has no LoRA loader or converter for Hunyuan-DiT's transformer (`HunyuanDiT2DModel` is no
`PeftAdapterMixin`; only HunyuanVideo has a converter), so its "transformer." keys are read in the
diffusers/peft layout through the UNet path's conversion, and kohya keys for it are not recognised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from diffusers.utils.peft_utils import _create_lora_config
from peft.utils.other import get_pattern_key

COMPONENTS = ("unet", "text_encoder", "transformer")


@dataclass(frozen=True)
class LoraWeights:
    """One layer's update, scale · B @ A: a (r, in), b (out, r), both on the host."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class LoraFile:
    """An adapter read from `source`: per component ("unet", "text_encoder", "transformer") the layers it
    targets, by module path in that component, and its largest rank."""

    source: str
    components: dict[str, dict[str, LoraWeights]]
    rank: int


def load_lora(source: str | Path, *, safetensors_only: bool = False) -> LoraFile:
    """Read a LoRA file, a folder holding one (`pytorch_lora_weights.safetensors` or the single .safetensors
    there) or a hub id, in fp32 whatever the file's dtype (the pool folds each scale into B before casting to
    the model's); a ValueError naming `source` for a layout this cannot serve. `safetensors_only` refuses
    pickled (.bin) weights, which can run code when read: the API's run-time loads set it."""
    name = str(source)
    path = Path(source)
    where, weight_name = (path.parent, path.name) if path.is_file() else (name, None)
    if safetensors_only and weight_name is not None and not weight_name.endswith(".safetensors"):
        raise ValueError(f"{name}: only .safetensors LoRA files are read here (pickled weights can run code)")
    try:
        state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            where, weight_name=weight_name, return_lora_metadata=True,
            use_safetensors=True if safetensors_only else None)
    except Exception as err:  # noqa: BLE001 — a missing file, the hub's network errors, a converter's KeyError
        raise ValueError(f"{name}: cannot read a LoRA from it: {type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]}") from err
    unknown = sorted({k.split(".")[0] for k in state_dict} - set(COMPONENTS))
    if unknown or not state_dict:
        example = next((k for k in state_dict if k.split(".")[0] in unknown), "no keys")
        raise ValueError(f"{name}: unknown LoRA layout (expected keys under {', '.join(COMPONENTS)} in the "
                         f"diffusers/peft or kohya format; found {example!r})")
    components = {}
    for component in COMPONENTS:
        part = _prefixed(state_dict, component)
        if part:
            components[component] = _convert(name, component, part, _prefixed(alphas or {}, component),
                                              _prefixed(metadata or {}, component) or None)
    rank = max(w.a.shape[0] for layers in components.values() for w in layers.values())
    return LoraFile(name, components, rank)


def _prefixed(d: dict, prefix: str) -> dict:
    return {k.removeprefix(f"{prefix}."): v for k, v in d.items() if k.startswith(f"{prefix}.")}


def _convert(name: str, component: str, state_dict: dict, alphas: dict, metadata: dict | None) -> dict:
    """diffusers' own conversion of one component's keys to peft's, its LoraConfig, and peft's scale per layer."""
    if component == "text_encoder":
        # diffusers runs `convert_state_dict_to_diffusers` + `convert_state_dict_to_peft`, each guessing the key
        # style from the whole dict, which fails on the mix its kohya converter writes (`to_q_lora.down` beside
        # `fc1.lora_linear_layer.down`); the old style's mapping converts both and keeps peft keys as they are.
        state_dict = convert_state_dict_to_peft(state_dict, original_type=StateDictType.DIFFUSERS_OLD)
        rank = {k: v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    else:
        # diffusers converts only when the first key is not peft's, but its own `convert_state_dict_to_diffusers`
        # writes a trained UNet's attention layers as `lora.down` and its proj_in/ff as `lora_A`, and 0.42 then
        # drops the attention layers of such a file; converting every key reads them all (peft keys stay as they are).
        state_dict = convert_unet_state_dict_to_peft(state_dict)
        rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    if not rank:
        raise ValueError(f"{name}: no LoRA layers for the {component} (keys such as {next(iter(state_dict))!r})")
    config = _create_lora_config(state_dict, alphas or None, metadata, rank, is_unet=component != "text_encoder")
    if config.use_dora or config.lora_bias:
        raise ValueError(f"{name}: DoRA and LoRA biases are not supported ({component})")
    extra = [k for k in state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        raise ValueError(f"{name}: keys that are no LoRA A/B weights, such as {extra[0]!r} ({component})")
    layers = {}
    for key, a in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = state_dict.get(f"{module}.lora_B.weight")
        if b is None or any(n != 1 for n in (*a.shape[2:], *b.shape[2:])):
            raise ValueError(f"{name}: {component}.{module} needs a LoRA B and 1x1 (or linear) weights, "
                             f"got A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)}")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / (math.sqrt(r) if config.use_rslora else r)
        layers[module] = LoraWeights(a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float(), float(scale))
    return layers
