"""Tiny LoRA adapters made with peft on the tiny SD checkpoint and saved as users' files are: diffusers'
`save_lora_weights` (with the adapter's metadata, as diffusers' trainers write it) of peft's keys, and of the keys
diffusers' trainers pass through `convert_state_dict_to_diffusers`; and kohya/A1111 keys from
diffusers' `convert_state_dict_to_kohya`, with each layer's `.alpha` set to the adapter's alpha as kohya's
trainer writes it (the converter writes alpha = rank)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import SanaLoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextModel


@dataclass(frozen=True)
class Spec:
    name: str
    unet: LoraConfig
    text_encoder: LoraConfig | None = None


SPECS = {
    "a": Spec("a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
                  "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj"]),
              LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])),
    "b": Spec("b", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["to_q", "to_v", "ff.net.2"]),
              LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, target_modules=["k_proj", "out_proj", "fc2"])),
    "c": Spec("c", LoraConfig(r=3, lora_alpha=1.5, init_lora_weights=False, target_modules=["to_k"])),
}


@dataclass
class Made:
    """An adapter's files and the peft-injected models it was made in (the reference for the text encoder)."""

    diffusers_dir: Path                 # peft keys under unet./text_encoder., as diffusers loads them whole
    mixed_dir: Path                     # after convert_state_dict_to_diffusers: `lora.down` and `lora_A` keys
    kohya_file: Path
    a1111_file: Path
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel | None


def make(spec: Spec, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, folder: Path, seed: int) -> Made:
    torch.manual_seed(seed)
    unet = copy.deepcopy(unet)
    unet.add_adapter(spec.unet, adapter_name=spec.name)
    usd = get_peft_model_state_dict(unet, adapter_name=spec.name)
    tsd, te = {}, None
    if spec.text_encoder is not None:
        te = inject_adapter_in_model(spec.text_encoder, copy.deepcopy(text_encoder), adapter_name=spec.name)
        tsd = get_peft_model_state_dict(te, adapter_name=spec.name)
    diffusers_dir, mixed_dir = folder / f"{spec.name}-diffusers", folder / f"{spec.name}-mixed-keys"
    for where, convert in ((diffusers_dir, dict), (mixed_dir, convert_state_dict_to_diffusers)):
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            where, unet_lora_layers=convert(usd), text_encoder_lora_layers=convert(tsd) if tsd else None,
            unet_lora_adapter_metadata=spec.unet.to_dict(),
            text_encoder_lora_adapter_metadata=spec.text_encoder.to_dict() if tsd else None)
    kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in usd.items()},
                                         **{f"text_encoder.{k}": v for k, v in tsd.items()}})
    for key in kohya:
        if key.endswith(".alpha"):
            config = spec.unet if key.startswith("lora_unet") else spec.text_encoder
            kohya[key] = torch.tensor(float(config.lora_alpha))
    kohya_file = folder / f"{spec.name}-kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(kohya_file))
    # SD1.5 files from kohya's trainer name the text encoder `lora_te_text_model_…`, from before transformers 5
    # dropped CLIPTextModel's `text_model` level.
    a1111_file = folder / f"{spec.name}-a1111.safetensors"
    save_file({k.replace("lora_te1_", "lora_te_text_model_"): v.contiguous() for k, v in kohya.items()},
              str(a1111_file))
    return Made(diffusers_dir, mixed_dir, kohya_file, a1111_file, unet.eval(), te.eval() if te is not None else None)


# Hunyuan-DiT's transformer, for which diffusers has no LoRA loader: adapters injected by peft and saved under
# "transformer." with the writer of diffusers' transformer families (Sana's), with their metadata.
TRANSFORMER_SPECS = {
    "x": LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v", "ff.net.2"]),
    "y": LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                    target_modules=["to_k", "to_out.0", "ff.net.0.proj"]),
}


@dataclass
class MadeTransformer:
    """A transformer adapter's folder, and its config and peft state dict (to inject it into a reference)."""

    folder: Path
    config: LoraConfig
    state: dict


def make_transformer(name: str, config: LoraConfig, transformer: torch.nn.Module, folder: Path,
                     seed: int) -> MadeTransformer:
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, copy.deepcopy(transformer), adapter_name=name)
    state = get_peft_model_state_dict(model, adapter_name=name)
    SanaLoraLoaderMixin.save_lora_weights(folder / name, state, transformer_lora_adapter_metadata=config.to_dict())
    return MadeTransformer(folder / name, config, state)


def with_adapters(model: torch.nn.Module, made: dict[str, MadeTransformer],
                  choice: tuple[tuple[str, float], ...]) -> torch.nn.Module:
    """A copy of `model` with the adapters of `choice` injected by peft and weighted by their scales, as diffusers'
    `set_adapters(names, scales)` weights adapters it loaded."""
    model = copy.deepcopy(model)
    for name, _ in choice:
        inject_adapter_in_model(made[name].config, model, adapter_name=name)
        loaded = set_peft_model_state_dict(model, made[name].state, adapter_name=name)
        assert not loaded.unexpected_keys, loaded.unexpected_keys
    set_weights_and_activate_adapters(model, [n for n, _ in choice], [s for _, s in choice])
    return model.eval()
