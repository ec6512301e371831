"""Janus / Janus-Pro architectures as named presets, built into transformers' own `JanusConfig`.

A served checkpoint always brings its own `config.json`; these presets exist to write random-weight
checkpoints in the same layout (tests, benchmarks). `janus-pro-1b` and `janus-pro-7b` mirror the published
architectures (`deepseek-community/Janus-Pro-1B`, `-7B`: SigLIP-L/16 at 384² for understanding, a DeepSeek-LLM
body, the 16384-entry VQ codebook whose 24×24 = 576 tokens decode to 384² pixels); `tiny` keeps every class
and key with small sizes, so tests run the real code paths in seconds.

The official generation defaults (Janus-Pro's `generation_config.json` and demo): 576 image tokens at 384²,
CFG weight 5, temperature 1 (sampling). They are `GENERATION_DEFAULTS`; the serving presets in
`model_zoo.presets` carry the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig


@dataclass(frozen=True)
class GenerationDefaults:
    image_side: int = 384
    image_tokens: int = 576
    cfg_weight: float = 5.0
    temperature: float = 1.0


GENERATION_DEFAULTS = GenerationDefaults()


@dataclass(frozen=True)
class JanusArch:
    """The sizes that differ between presets; everything else is the transformers class default."""
    hidden: int                       # LLM width; also the generation aligner's and head's width
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int                      # max_position_embeddings
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 384             # understanding input; the VQ grid is image_size / patch_size per side
    patch_size: int = 16
    codebook: int = 16384
    vq_base_channels: int = 128
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)   # 2**(len − 1) = 16× upsampling: 24 → 384
    vq_latent_channels: int = 256
    vq_res_blocks: int = 2
    init_range: float = 0.02

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_side(self) -> int:
        """The generated picture's side: the VQ grid side times the decoder's upsampling."""
        return self.image_size // self.patch_size * 2 ** (len(self.vq_channel_multiplier) - 1)


ARCHS: dict[str, JanusArch] = {
    "janus-pro-1b": JanusArch(hidden=2048, intermediate=5632, layers=24, heads=16, kv_heads=16, vocab=102400,
                              context=16384),
    "janus-pro-7b": JanusArch(hidden=4096, intermediate=11008, layers=30, heads=32, kv_heads=32, vocab=102400,
                              context=16384),
    # 4×4 = 16 image tokens decoded to 16² pixels. The VQ blocks' GroupNorm has 32 groups, hence 32 channels.
    "tiny": JanusArch(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=512, context=256,
                      vision_hidden=16, vision_layers=1, vision_heads=2, image_size=32, patch_size=8, codebook=64,
                      vq_base_channels=32, vq_channel_multiplier=(1, 1, 1), vq_latent_channels=32, vq_res_blocks=1,
                      init_range=0.2),
}


@dataclass(frozen=True)
class TokenIds:
    """The special tokens the config records (the converter reads them off the tokenizer)."""
    bos: int
    eos: int
    pad: int
    image: int


def janus_config(name: str, ids: TokenIds, vocab_size: int | None = None) -> JanusConfig:
    """The preset as a `JanusConfig`; `vocab_size` overrides the LLM vocabulary (a small test tokenizer)."""
    if name not in ARCHS:
        raise KeyError(f"unknown Janus preset {name!r}; known: {', '.join(ARCHS)}")
    a = ARCHS[name]
    text = LlamaConfig(vocab_size=vocab_size or a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=a.context, initializer_range=a.init_range,
                       bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad)
    vision = JanusVisionConfig(hidden_size=a.vision_hidden, num_hidden_layers=a.vision_layers,
                               num_attention_heads=a.vision_heads, image_size=a.image_size, patch_size=a.patch_size,
                               projection_dim=a.hidden, num_image_tokens=a.image_tokens, initializer_range=a.init_range)
    vq = JanusVQVAEConfig(num_embeddings=a.codebook, base_channels=a.vq_base_channels,
                          channel_multiplier=list(a.vq_channel_multiplier), latent_channels=a.vq_latent_channels,
                          num_res_blocks=a.vq_res_blocks, projection_dim=a.hidden, image_token_embed_dim=a.hidden,
                          initializer_range=a.init_range)
    # The published checkpoints keep lm_head apart from the embeddings; transformers reads the top-level flag
    # (JanusConfig defaults it to True, which would tie them and drop one 102400 × hidden matrix).
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids.image,
                       tie_word_embeddings=False)
