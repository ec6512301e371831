"""Every kernel launch the served models make on a GPU, at every served size and batch bucket, built by the
launch wrappers themselves on meta tensors (shapes, strides and dtypes without memory), for the compile check.

Shapes come from the published configurations: SD1.5's UNet (8 heads at 320/640/1280 channels: head dims
40/80/160, attention at latent levels 0-2 and the mid block, cross-attention to 77 CLIP tokens) and VAE (one
512-wide head at the latent size), Hunyuan-DiT (16 heads of 88 on the 16-px patch grid, cross-attention to
77 BERT + 256 mT5 tokens), and the latents the velocity kernels update (4 channels at 1/8 of the image side).
The attention operands are laid out as the processor passes them: projections (B, L, H·D) viewed as
(B, H, L, D); Hunyuan's query and key are materialised by qk-norm and RoPE, its value stays a view.

Chat decode attention (the split kernel and its combine) runs for the LLMs of JanusFlow-1.3B and Janus-Pro
1B/7B at every row bucket the chat decoder captures on CUDA, over the paged cache (blocks of
`model_zoo.paged_kv.PAGE` tokens) with a block table as wide as the full context: the one width CUDA captures
(`PagedDecoder.fast_path`).

The per-row LoRA kernels run at SD1.5's UNet adapter layers with every binding width a request may ask for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rfserve.kernels.launch import Launch
from rfserve.model_zoo.hunyuan_dit.geometry import SUPPORTED_SHAPES
from rfserve.model_zoo.janus.config import ARCHS as JANUS_ARCHS
from rfserve.model_zoo.janusflow.config import preset as janusflow_preset
from rfserve.model_zoo.paged_kv import PAGE
from rfserve.model_zoo.presets import PRESETS
from rfserve.server.chat.config import ChatConfig
from rfserve.server.config import ServerConfig

META = torch.device("meta")
SD_UNET_HEADS, SD_UNET_HEAD_DIMS, CLIP_TOKENS = 8, (40, 80, 160, 160), 77  # levels 0, 1, 2 and the mid block
SD_VAE_HEAD_DIM = 512
# The LoRA pool's widest binding (`server.config.LoraConfig`: max_rank 64, up to 4 adapters per row, 2·max_batch
# rows) and SD1.5's UNet: (channels, tokens) per level at 512² (64² latents) and its CLIP context.
LORA_RANK, LORA_ADAPTERS, LORA_ROWS, LORA_SLOTS = 64, (1, 2, 3, 4), 64, 8
SD_LEVELS, SD_CROSS = ((320, 4096), (640, 1024), (1280, 256), (1280, 64)), (768, 77)
HUNYUAN_HEADS, HUNYUAN_HEAD_DIM, HUNYUAN_TEXT_TOKENS = 16, 88, 77 + 256
JANUSFLOW_LATENT = 48  # 384 px / 8
SD15_PRESETS = ("instaflow-0.9b", "instaflow-2rf", "perflow-sd15")


@dataclass(frozen=True)
class ServedLaunch:
    """One launch shape: `op` is the dispatcher's op name; `build(dtype)` returns the wrapper's Launch."""

    model: str
    op: str
    shape: str
    build: Callable[[torch.dtype], Launch]

    @property
    def label(self) -> str:
        return f"{self.model} {self.op} {self.shape}"


def _projected(B: int, L: int, H: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(B, L, H, D, device=META, dtype=dtype).transpose(1, 2)  # (B, H, L, D) view of (B, L, H·D)


def _attention(model, B, H, D, Lq, Lk, *, materialised_qk=False) -> ServedLaunch:
    def build(dtype):
        from rfserve.kernels.triton_attention import attention_launch

        q, k, v = _projected(B, Lq, H, D, dtype), _projected(B, Lk, H, D, dtype), _projected(B, Lk, H, D, dtype)
        if materialised_qk:
            q, k = q.contiguous(), k.contiguous()
        return attention_launch(q, k, v)

    return ServedLaunch(model, "attention", f"B{B} H{H} D{D} Lq{Lq} Lk{Lk}", build)


def _velocity(model, op, latent, guidance) -> ServedLaunch:
    """guidance: "none" (no CFG), "float" (one scale for the batch) or "rows" (the batcher's mixed scales)."""
    def build(dtype):
        from rfserve.kernels.triton_velocity import cfg_euler_launch, perflow_launch

        x = torch.empty(latent, device=META, dtype=dtype)
        v = torch.empty(latent[0] * (1 if guidance == "none" else 2), *latent[1:], device=META, dtype=dtype)
        g = {"none": None, "float": 4.5, "rows": torch.empty(latent[0], device=META)}[guidance]
        if op == "perflow":
            return perflow_launch(x, v, lam=0.9, eta=0.4, inv_span=2.0, dt=0.25, guidance=g)
        return cfg_euler_launch(x, v, 0.25, g, cond_first=op == "janus_cfg_euler")

    return ServedLaunch(model, op, f"x{tuple(latent)} guidance {guidance}", build)


def _chat_llms() -> dict[str, tuple[int, int, int, int]]:
    """(heads, kv heads, head dim, context) of each chat LLM, read from the presets."""
    flow = janusflow_preset("janusflow-1.3b")["language_config"]
    llms = {"janusflow-1.3b": (flow["num_attention_heads"], flow["num_key_value_heads"],
                               flow["hidden_size"] // flow["num_attention_heads"], flow["max_position_embeddings"])}
    for name in ("janus-pro-1b", "janus-pro-7b"):
        a = JANUS_ARCHS[name]
        llms[name] = (a.heads, a.kv_heads, a.hidden // a.heads, a.context)
    return llms


def _decode(model, B, H, kv_heads, D, context, slots, page) -> list[ServedLaunch]:
    """Both kernels of one decode call: B running rows of a cache sized for `slots` sequences of `context`
    tokens, in blocks of `page` tokens, each row's table as wide as the context."""
    def build(dtype):
        from rfserve.kernels.triton_decode import decode_launches

        q = torch.empty(B, H, D, device=META, dtype=dtype)  # (B, H, D) view of the (B, H·D) projection
        k = torch.empty(slots * context // page, kv_heads, page, D, device=META, dtype=dtype)
        table = torch.empty(B, context // page, device=META, dtype=torch.int32)
        lengths = torch.empty(B, device=META, dtype=torch.int32)
        return decode_launches(q, k, torch.empty_like(k), table, lengths)

    shape = f"B{B} H{H} Hkv{kv_heads} D{D} ctx{context} page{page}"
    return [ServedLaunch(model, "decode_attention", shape, lambda dtype: build(dtype).split),
            ServedLaunch(model, "decode_combine", shape, lambda dtype: build(dtype).combine)]


def chat_buckets(buckets: tuple[int, ...], slots: int) -> list[int]:
    """The row counts the chat decoder captures (`PagedDecoder.fast_path`): the buckets under `slots`, and `slots`
    (on CUDA at one table width, the whole context)."""
    return sorted({b for b in buckets if b < slots} | {slots})


def _sd_sizes() -> list[tuple[int, int]]:
    """(width, height) in px of every SD1.5 size the presets serve (native 512 × each size factor)."""
    factors = {f for name in SD15_PRESETS for f in PRESETS[name].size_factors}
    return sorted({(int(512 * fw), int(512 * fh)) for fw, fh in factors})


def served_launches(buckets: tuple[int, ...] = ServerConfig.batch_buckets) -> list[ServedLaunch]:
    """Every launch, in a stable order. CFG doubles the model batch (2B); InstaFlow-0.9B runs without it (B)."""
    out: list[ServedLaunch] = []
    for b in buckets:
        for w, h in _sd_sizes():
            lh, lw = h // 8, w // 8
            for B in (b, 2 * b):
                for level, D in enumerate(SD_UNET_HEAD_DIMS):
                    L = (lh >> min(level, 3)) * (lw >> min(level, 3))
                    out.append(_attention("sd15-unet", B, SD_UNET_HEADS, D, L, L))
                    out.append(_attention("sd15-unet", B, SD_UNET_HEADS, D, L, CLIP_TOKENS))
            out.append(_attention("sd15-vae", b, 1, SD_VAE_HEAD_DIM, lh * lw, lh * lw))
            latent = (b, 4, lh, lw)
            for g in ("float", "rows"):
                out.append(_velocity("instaflow-2rf", "cfg_euler", latent, g))
            for g in ("none", "float", "rows"):
                out.append(_velocity("perflow-sd15", "perflow", latent, g))
        for w, h in SUPPORTED_SHAPES:
            L = (w // 16) * (h // 16)
            out.append(_attention("hunyuan-dit", 2 * b, HUNYUAN_HEADS, HUNYUAN_HEAD_DIM, L, L, materialised_qk=True))
            out.append(_attention("hunyuan-dit", 2 * b, HUNYUAN_HEADS, HUNYUAN_HEAD_DIM, L, HUNYUAN_TEXT_TOKENS,
                                  materialised_qk=True))
        for g in ("float", "rows"):
            out.append(_velocity("janusflow", "janus_cfg_euler", (b, 4, JANUSFLOW_LATENT, JANUSFLOW_LATENT), g))
    slots = ChatConfig().slots_on("cuda")
    for model, (H, kv_heads, D, context) in _chat_llms().items():
        for b in chat_buckets(buckets, slots):
            out.extend(_decode(model, b, H, kv_heads, D, context, slots, PAGE))
    return out + _lora_launches()


def _lora(layer, rows, tokens, n_in, n_out, k, *, nchw=False) -> list[ServedLaunch]:
    """Both kernels of one adapter layer on x (rows, tokens, n_in), or (rows, n_in) where `tokens` is None;
    `nchw`: x is a 1x1 conv's (R, H·W, C) view of an NCHW input."""
    def build(dtype):
        from rfserve.kernels.triton_lora import lora_launches

        if nchw:
            x = torch.empty(rows, n_in, tokens, device=META, dtype=dtype).transpose(1, 2)  # (R, L, C) of (R, C, L)
        else:
            x = torch.empty(rows, tokens or 1, n_in, device=META, dtype=dtype)  # (R, 1, in): how (R, in) launches
        a = torch.empty(LORA_SLOTS + 1, LORA_RANK, n_in, device=META, dtype=dtype)
        b = torch.empty(LORA_SLOTS + 1, n_out, LORA_RANK, device=META, dtype=dtype)
        slots = torch.empty(LORA_ROWS, k, device=META, dtype=torch.long)[:rows]     # the binding's first rows
        scales = torch.empty(LORA_ROWS, k, device=META)[:rows]
        return lora_launches(x, a, b, slots, scales)

    shape = f"{layer} R{rows}" + (f" L{tokens}" if tokens else "") + f" in{n_in} out{n_out} r{LORA_RANK} K{k}" \
        + (" nchw" if nchw else "")
    return [ServedLaunch("sd15-unet", "lora_shrink", shape, lambda dtype: build(dtype).shrink),
            ServedLaunch("sd15-unet", "lora_expand", shape, lambda dtype: build(dtype).expand)]


def _lora_launches() -> list[ServedLaunch]:
    """The UNet's adapter layers at each level (`pool.UNET_TARGETS`): attention projections, cross-attention
    keys and values from the CLIP context, the GEGLU feed-forward (c -> 8c, 4c -> c), proj_in as a 1x1 conv
    on NCHW, and a no-token (R, in) linear; each binding width 1-4. Launches differing only in sizes share
    binaries (`_specialisation`): eight per dtype and target."""
    out: list[ServedLaunch] = []
    rows = LORA_ROWS
    for k in LORA_ADAPTERS:
        for c, tokens in SD_LEVELS:
            out += _lora("to_q", rows, tokens, c, c, k)
            out += _lora("to_k", rows, SD_CROSS[1], SD_CROSS[0], c, k)
            out += _lora("ff.net.0.proj", rows, tokens, c, 8 * c, k)
            out += _lora("ff.net.2", rows, tokens, 4 * c, c, k)
            out += _lora("proj_in", rows, tokens, c, c, k, nchw=True)
        out += _lora("linear", rows, None, 1280, 1280, k)
    return out
