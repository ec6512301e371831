"""A memory plan for a set of served models on a GPU of a given size, from their configurations alone.

Each model is built on the meta device from its published configuration (or from the config files of a local
checkpoint folder, `NAME=PATH`), so nothing is downloaded and nothing is allocated. The plan, per model:
- weights: every parameter and buffer at the serving dtype;
- LoRA slots (with `lora`, for the families that serve adapters): what the adapter pools allocate at setup,
  counted from the same shapes (`lora.pool.slot_bytes`) and held from load on, as the weights are;
- activation: the largest peak of one stage's forward at `max_batch` (text encode, one denoising forward,
  decode), measured on meta by `meta_peak`, not estimated;
- chat KV: what is left of the budget after every model's weights and one activation reserve, in blocks of
  PAGE tokens, the same number of tokens for each chat model.

Budget: device memory × utilization (vLLM's `gpu_memory_utilization`). One forward runs on a device at a time
(the engine's loop), so the reserve is the largest activation of any model, not their sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, cast

import torch
from diffusers import AutoencoderKL, HunyuanDiT2DModel, UNet2DConditionModel
from torch import nn
from transformers import (BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, JanusConfig,
                          JanusForConditionalGeneration, T5Config, T5EncoderModel)

from rfserve.model_zoo.hunyuan_dit.arch import PRESETS as HUNYUAN_ARCHS
from rfserve.model_zoo.hunyuan_dit.geometry import rotary_tables, supported_sizes
from rfserve.model_zoo.janus.config import TokenIds, janus_config
from rfserve.model_zoo.janusflow.config import JanusFlowConfig, preset as janusflow_preset
from rfserve.model_zoo.janusflow.llm import T2I_PREFIX_TOKENS, KVPool, LlamaBody, run_layers
from rfserve.model_zoo.janusflow.loading import build_model as build_janusflow
from rfserve.model_zoo.loading import read_json
from rfserve.model_zoo.lora.pool import PoolConfig, lora_rows, slot_bytes
from rfserve.model_zoo.memory_units import GiB, parse_bytes
from rfserve.model_zoo.meta_peak import peak_bytes
from rfserve.model_zoo.paged_kv import PAGE, llm_bytes_per_token
from rfserve.model_zoo.presets import ModelSpec
from rfserve.model_zoo.registry import parse_spec
from rfserve.model_zoo.sd_config import PRESETS as SD_ARCHS

SDXL_VAE = HUNYUAN_ARCHS["v1.2"].vae          # JanusFlow decodes with stabilityai/sdxl-vae, as Hunyuan-DiT does
__all__ = ["PAGE", "MemoryPlan", "ModelPlan", "kv_blocks", "parse_bytes", "plan_memory", "share_kv"]


def kv_blocks(nbytes: int, bytes_per_token: int) -> int:
    """Whole PAGE-token blocks that fit in `nbytes`."""
    return max(0, nbytes) // (bytes_per_token * PAGE)


@dataclass
class Footprint:
    """A model as the planner sees it: its modules, and its stages as forwards to measure."""
    modules: list[nn.Module]
    stages: dict[str, Callable[[], object]]
    kv_bytes_per_token: int = 0       # chat models only
    context: int = 0                  # tokens one chat sequence may reach
    held_bytes: int = 0               # what a stage keeps between batches: the text-to-image KV pool (KVPool.reserve)
    adapters: list[tuple[nn.Module, str]] = field(default_factory=list)   # LoRA pools: module, component name

    def weights_bytes(self) -> int:
        tensors = {id(t): t for m in self.modules for t in (*m.parameters(), *m.buffers())}   # tied once
        return sum(t.nbytes for t in tensors.values())

    def activation_bytes(self) -> dict[str, int]:
        return {name: peak_bytes(stage) for name, stage in self.stages.items()}

    def lora_bytes(self, config: PoolConfig | None, rows: int) -> int:
        """The slots of `config` (its slots, max rank and adapters per row) on every component the family's pools
        wrap, each with its component's targets, bound for forwards of `rows` rows; 0 without `config`."""
        if config is None:
            return 0
        return sum(slot_bytes(module, component, replace(config, max_rows=rows))
                   for module, component in self.adapters)


@dataclass
class ModelPlan:
    name: str
    family: str
    weights_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int = 0
    context: int = 0
    kv_tokens: int = 0
    stages: dict[str, int] = field(default_factory=dict)     # each stage's peak; activation is their max
    held_bytes: int = 0               # the part of the activation held from load on (Footprint.held_bytes)
    lora_bytes: int = 0               # the LoRA pools' slots, held from load on (Footprint.lora_bytes)

    @property
    def chats(self) -> bool:
        return self.kv_bytes_per_token > 0

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * self.kv_bytes_per_token

    @property
    def total_bytes(self) -> int:
        """What this model needs alone: its weights, its LoRA slots, its own activation peak and its KV."""
        return self.weights_bytes + self.lora_bytes + self.activation_bytes + self.kv_bytes

    def to_json(self) -> dict:
        return {"name": self.name, "family": self.family, "weights_bytes": self.weights_bytes,
                "activation_bytes": self.activation_bytes, "kv_bytes": self.kv_bytes, "kv_tokens": self.kv_tokens,
                "kv_bytes_per_token": self.kv_bytes_per_token, "held_bytes": self.held_bytes,
                "lora_bytes": self.lora_bytes, "total_bytes": self.total_bytes}


@dataclass
class MemoryPlan:
    device_memory: int
    utilization: float
    models: list[ModelPlan]
    problem: str | None = None

    @property
    def budget_bytes(self) -> int:
        return int(self.device_memory * self.utilization)

    @property
    def held_bytes(self) -> int:
        return sum(m.held_bytes for m in self.models)

    @property
    def fixed_bytes(self) -> int:
        """What is held from load on, whatever runs: weights, LoRA slots, text-to-image KV pools."""
        return sum(m.weights_bytes + m.lora_bytes for m in self.models) + self.held_bytes

    @property
    def reserve_bytes(self) -> int:
        """One activation reserve: the largest transient peak of any model, as only one forward runs at a time.
        What a model holds from load on (its text-to-image KV pool) is counted apart, once per model."""
        return max((m.activation_bytes - m.held_bytes for m in self.models), default=0)

    @property
    def fits(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {"device_memory": self.device_memory, "utilization": self.utilization,
                "budget_bytes": self.budget_bytes, "fits": self.fits, "problem": self.problem,
                "models": [m.to_json() for m in self.models]}

    def table(self) -> str:
        rows = [("model", "family", "weights", "lora", "activation", "kv", "kv tokens", "total")]
        rows += [(m.name, m.family, _gib(m.weights_bytes), _gib(m.lora_bytes), _gib(m.activation_bytes),
                  _gib(m.kv_bytes), f"{m.kv_tokens:,}" if m.chats else "-", _gib(m.total_bytes)) for m in self.models]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        used = self.fixed_bytes + sum(m.kv_bytes for m in self.models) + self.reserve_bytes
        lines += ["", f"budget {_gib(self.budget_bytes)} GiB = {_gib(self.device_memory)} GiB × {self.utilization:g}; "
                      f"planned {_gib(used)} GiB (weights + LoRA slots + KV + text-to-image KV pools of "
                      f"{_gib(self.held_bytes)} GiB + one activation reserve of {_gib(self.reserve_bytes)} GiB); "
                      f"sizes in GiB"]
        lines.append("fits" if self.fits else f"does not fit: {self.problem}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def plan_memory(specs: list[str] | list[ModelSpec], *, device_memory: int, utilization: float = 0.9, max_batch: int = 8,
                dtype: torch.dtype = torch.bfloat16, max_seqs: int = 32, max_len: int | None = None,
                lora: PoolConfig | None = None) -> MemoryPlan:
    """The plan for serving `specs` together on one device of `device_memory` bytes; with `lora`, each model that
    serves adapters holds that many slots of that rank (see `plan_model`)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    models = [plan_model(parse_spec(s) if isinstance(s, str) else s, device="meta", dtype=dtype,
                         max_batch=max_batch, lora=lora) for s in specs]
    plan = MemoryPlan(device_memory, utilization, models)
    for m in models:
        m.context = min(m.context, max_len) if max_len else m.context
    free = plan.budget_bytes - plan.fixed_bytes - plan.reserve_bytes
    if free < 0:
        plan.problem = (f"weights, LoRA slots and text-to-image KV pools {_gib(plan.fixed_bytes)} GiB + activation "
                        f"reserve {_gib(plan.reserve_bytes)} GiB exceed the budget of {_gib(plan.budget_bytes)} GiB")
        return plan
    share_kv([m for m in models if m.chats], free, max_seqs)
    short = next((m for m in models if m.chats and m.kv_tokens < m.context), None)
    if short is not None:
        plan.problem = (f"{short.name} gets {short.kv_tokens:,} KV tokens, less than one full-context sequence "
                        f"({short.context:,}); {_gib(free)} GiB is left for KV after weights and activations")
    return plan


def share_kv(chat: list[ModelPlan], free: int, max_seqs: int) -> None:
    """Give every chat model the same number of tokens from `free` bytes, in whole blocks; a model never gets
    more than `max_seqs` full-context sequences, and what it leaves goes to the others."""
    waiting = sorted(chat, key=lambda m: max_seqs * m.context)
    while waiting:
        tokens = free // sum(m.kv_bytes_per_token for m in waiting)
        first = waiting[0]
        if max_seqs * first.context > tokens:
            for m in waiting:
                m.kv_tokens = kv_blocks(tokens * m.kv_bytes_per_token, m.kv_bytes_per_token) * PAGE
            return
        first.kv_tokens = max_seqs * first.context // PAGE * PAGE
        free -= first.kv_bytes
        waiting.pop(0)


def plan_model(spec: ModelSpec, *, device, dtype: torch.dtype, max_batch: int,
               lora: PoolConfig | None = None) -> ModelPlan:
    """One model's weights and the activation of each stage at `max_batch`, built on `device` (meta to plan;
    the CPU in tests that check the figures against real allocation). With `lora`, its LoRA slots: `lora`'s
    slots, max rank and adapters per row on each component the family wraps, with the family's targets, bound
    for the largest forward at `max_batch` (`lora_rows`, with CFG where the preset's default guidance uses it,
    as the denoise stage is measured)."""
    fp = footprint(spec, torch.device(device), dtype, max_batch)
    stages = fp.activation_bytes()
    return ModelPlan(spec.name, spec.preset.family, fp.weights_bytes(), max(stages.values(), default=0),
                     fp.kv_bytes_per_token, fp.context, stages=stages, held_bytes=fp.held_bytes,
                     lora_bytes=fp.lora_bytes(lora, lora_rows(max_batch, _cfg(spec))))


def footprint(spec: ModelSpec, device: torch.device, dtype: torch.dtype, max_batch: int) -> Footprint:
    folder = Path(spec.source) if spec.source and Path(spec.source).is_dir() else None
    family = spec.preset.family
    if family == "synthetic":
        return Footprint([], {})
    builder = {"instaflow": _sd, "perflow": _sd, "hunyuan-dit": _hunyuan, "janusflow": _janusflow,
               "janus": _janus}[family]
    with torch.device(device):
        return builder(spec, folder, device, dtype, max_batch)


def _ready(module: Any, dtype: torch.dtype) -> Any:
    """The module as served: at `dtype`, in eval mode. Any: its `config` and methods are read as the library's."""
    return module.to(dtype).eval().requires_grad_(False)


def _zeros(*shape: int, device, dtype=torch.long) -> torch.Tensor:
    return torch.zeros(shape, device=device, dtype=dtype)


def _cfg(spec: ModelSpec) -> bool:
    return spec.preset.defaults.guidance > 1.0


def _largest(native: int, factors: tuple[tuple[float, float], ...], step: int) -> tuple[int, ...]:
    """The largest (width, height) of the preset's sizes, snapped as the registry's cards snap them."""
    sizes = [tuple(max(step, round(native * f / step) * step) for f in fw_fh) for fw_fh in factors]
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def _sd(spec, folder, device, dtype, B) -> Footprint:
    """SD1.5-layout UNet + VAE + CLIP text encoder: the checkpoint folder's configs, or the SD1.5 architecture."""
    if folder is not None:
        unet = UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(read_json(folder / "vae" / "config.json"))
        text_cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    else:
        arch = SD_ARCHS["sd15"]
        unet, vae = UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae)
        text_cfg = CLIPTextConfig(**arch.text, max_position_embeddings=arch.max_tokens)
    text = _ready(CLIPTextModel(text_cfg), dtype)
    unet, vae = _ready(unet, dtype), _ready(vae, dtype)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = _largest(unet.config.sample_size * f, spec.preset.size_factors, 8 * f)
    rows, L, C = lora_rows(B, _cfg(spec)), text_cfg.max_position_embeddings, unet.config.in_channels
    return Footprint([unet, vae, text], adapters=[(unet, "unet"), (text, "text_encoder")], stages={
        "encode": lambda: text(_zeros(rows, L, device=device))[0],                            # (rows, L, D)
        "denoise": lambda: unet(_zeros(rows, C, h // f, w // f, device=device, dtype=dtype),
                                _zeros(rows, device=device, dtype=dtype),
                                encoder_hidden_states=_zeros(rows, L, text_cfg.hidden_size, device=device,
                                                             dtype=dtype), return_dict=False)[0],
        "decode": lambda: vae.decode(_zeros(B, vae.config.latent_channels, h // f, w // f, device=device,
                                            dtype=dtype), return_dict=False)[0],              # (B, 3, H, W)
    })


def _hunyuan(spec, folder, device, dtype, B) -> Footprint:
    """DiT + BERT + mT5 encoder + SDXL VAE. Without a folder, the v1.2 architecture with the published
    vocabularies (47020 BERT entries, 250112 mT5 entries), which the random benchmark checkpoints now also use."""
    if folder is not None:
        dit = HunyuanDiT2DModel.from_config(read_json(folder / "transformer" / "config.json"))
        vae = AutoencoderKL.from_config(read_json(folder / "vae" / "config.json"))
        bert_cfg = BertConfig.from_pretrained(folder / "text_encoder")
        t5_cfg = T5Config.from_pretrained(folder / "text_encoder_2")
    else:
        arch = HUNYUAN_ARCHS["v1.2"]
        dit, vae = HunyuanDiT2DModel(**arch.transformer), AutoencoderKL(**arch.vae)
        bert_cfg, t5_cfg = BertConfig(**arch.bert), T5Config(**arch.t5)
    dit, vae = _ready(dit, dtype), _ready(vae, dtype)
    bert, t5 = _ready(BertModel(bert_cfg, add_pooling_layer=False), dtype), _ready(T5EncoderModel(t5_cfg), dtype)
    c, f = dit.config, 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = max(((int(a), int(b)) for a, b in (s.split("x") for s in supported_sizes(c.sample_size))),
               key=lambda wh: wh[0] * wh[1])
    rows = lora_rows(B, _cfg(spec))

    def denoise():
        cond = dict(encoder_hidden_states=_zeros(rows, c.text_len, c.cross_attention_dim, device=device, dtype=dtype),
                    text_embedding_mask=_zeros(rows, c.text_len, device=device),
                    encoder_hidden_states_t5=_zeros(rows, c.text_len_t5, c.cross_attention_dim_t5, device=device,
                                                    dtype=dtype),
                    text_embedding_mask_t5=_zeros(rows, c.text_len_t5, device=device),
                    image_rotary_emb=rotary_tables(w, h, dit.inner_dim // dit.num_heads, c.patch_size, f, device))
        if c.use_style_cond_and_image_meta_size:
            cond.update(image_meta_size=_zeros(rows, 6, device=device, dtype=dtype), style=_zeros(rows, device=device))
        x = _zeros(rows, c.in_channels, h // f, w // f, device=device, dtype=dtype)
        return dit(x, _zeros(rows, device=device, dtype=dtype), **cond, return_dict=False)[0]

    def encode():   # without the padding masks, which on meta cannot be inspected; they are (rows, L) each
        return (bert(_zeros(rows, c.text_len, device=device))[0],                              # (rows, 77, 1024)
                t5(_zeros(rows, c.text_len_t5, device=device))[0])                            # (rows, 256, 2048)

    return Footprint([dit, vae, bert, t5], adapters=[(dit, "transformer")], stages={
        "encode": encode, "denoise": denoise,
        "decode": lambda: vae.decode(_zeros(B, vae.config.latent_channels, h // f, w // f, device=device,
                                            dtype=dtype), return_dict=False)[0]})


def _prefill(lm, embed: Callable, rows: int, prompt: int, width: int, kv, device) -> torch.Tensor:
    """The t2i prompt forward as the pipelines run it: `rows` prompts of `prompt` tokens, written at column 0
    of `kv`, under a (rows, 1, prompt, width) causal mask. Returns the hidden states (rows, prompt, D)."""
    col = torch.arange(prompt, device=device)
    mask = torch.ones(prompt, width, dtype=torch.bool, device=device).tril()[None, None].expand(rows, 1, -1, -1)
    return run_layers(lm, embed(_zeros(rows, prompt, device=device)), col.expand(rows, prompt), kv, write=0,
                      mask=mask.contiguous())


def _janusflow(spec, folder, device, dtype, B) -> Footprint:
    """The LLM with its SigLIP and ShallowUViT heads, and the SDXL VAE. Text-to-image runs every step with CFG
    (2B rows) over the prompt KV: the sample stage is the prompt prefill plus one flow step."""
    cfg = JanusFlowConfig.from_dict(read_json(folder / "config.json") if folder else janusflow_preset(spec.name))
    model = build_janusflow(cfg, device, dtype)
    vae_dir = folder / "vae" if folder is not None and (folder / "vae").is_dir() else None
    vae = _ready(AutoencoderKL.from_config(read_json(vae_dir / "config.json")) if vae_dir else
                 AutoencoderKL(**SDXL_VAE), torch.bfloat16 if dtype == torch.float16 else dtype)
    lm, R = model.language_model, 2 * B
    side = cfg.understanding.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (cfg.gen_encoder.input_channels, side, side)
    G, context = (side // cfg.gen_encoder.stride) ** 2, cfg.language.max_position_embeddings
    P = min(T2I_PREFIX_TOKENS, context - 1 - G)

    def sample():
        kv = KVPool(lm, device, dtype).batch(R, P + 1 + G)
        _prefill(lm, lm.get_input_embeddings(), R, P, P, kv, device)
        tokens, t_emb, skips = model.encode_latents(_zeros(R, *latent, device=device, dtype=dtype),
                                                    _zeros(R, device=device, dtype=dtype))     # (R, G, D), (R, D)
        x = torch.cat([t_emb[:, None], tokens], dim=1)                                        # (R, 1+G, D)
        mask = torch.ones(R, 1, 1 + G, P + 1 + G, dtype=torch.bool, device=device)
        h = run_layers(lm, x, _zeros(R, 1 + G, device=device), kv, write=P, mask=mask)
        return model.decode_velocity(h[:, 1:], skips, t_emb)                                 # (R, 4, h, w)

    return Footprint([model, vae], {
        "sample": sample,
        "decode": lambda: vae.decode(_zeros(B, *latent, device=device, dtype=vae.dtype), return_dict=False)[0]},
        llm_bytes_per_token(cfg.language, dtype), context, R * (P + 1 + G) * llm_bytes_per_token(cfg.language, dtype))


def _janus(spec, folder, device, dtype, B) -> Footprint:
    """JanusForConditionalGeneration (lm_head apart from the embeddings, as published). Text-to-image holds the
    KV of 2B rows × (prompt + G image tokens); the sample stage is that KV and the prompt prefill (each later
    step feeds one token). Decode is the VQ decoder at B images."""
    if folder is not None:
        cfg = JanusConfig.from_pretrained(folder)
    else:   # the token ids size nothing
        cfg = janus_config(spec.name, TokenIds(bos=0, eos=1, pad=2, image=3))
    model = _ready(JanusForConditionalGeneration(cfg), dtype)
    text: Any = cfg.text_config
    G = cast(Any, cfg.vision_config).num_image_tokens
    lm, R = LlamaBody(model.model.language_model), 2 * B
    P = min(T2I_PREFIX_TOKENS, text.max_position_embeddings - G)

    def sample():
        kv = KVPool(lm, device, dtype).batch(R, P + G)
        h = _prefill(lm, model.get_input_embeddings(), R, P, P + G, kv, device)              # (R, P, D)
        return model.model.generation_head(h[:, -1])                                          # (R, codebook)

    return Footprint([model], {
        "sample": sample,
        "decode": lambda: model.decode_image_tokens(_zeros(B, G, device=device))},            # (B, H, W, 3)
        llm_bytes_per_token(text, dtype), text.max_position_embeddings, R * (P + G) * llm_bytes_per_token(text, dtype))
