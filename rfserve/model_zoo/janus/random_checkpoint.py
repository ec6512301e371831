"""Random-weight Janus checkpoints in the HF layout (`deepseek-community/Janus-Pro-*`), for tests and benchmarks.

Everything is written with transformers' own `save_pretrained`: config.json + model.safetensors +
generation_config.json from `JanusForConditionalGeneration`, and tokenizer.json, tokenizer_config.json and
processor_config.json from `JanusProcessor`, so our loader reads what it reads from the hub. The tokenizer is
a small byte-level BPE built offline (as JanusFlow's test tokenizer is), carrying the DeepSeek special tokens
and the image tokens the processor looks up as `tokenizer.image_token`, `boi_token` and `eoi_token`.
The generation config holds what the official converter sets: temperature 1, CFG weight 5, the pad token
and `generation_kwargs.boi_token_id` (the unconditional rows keep BOS and BOI).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (GenerationConfig, JanusForConditionalGeneration, JanusProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from rfserve.model_zoo.janus.config import ARCHS, GENERATION_DEFAULTS, TokenIds, janus_config
from rfserve.model_zoo.janusflow.random_checkpoint import build_tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT)

# The DeepSeek sft format of the published template, for text and image parts:
# "<|User|>: {text}\n\n<|Assistant|>:" with the assistant's turns closed by EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|User|>: {% elif m['role'] == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ m['role'].capitalize() }}: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>"
    "{% elif c['type'] == 'text' %}{{ c['text'].strip() }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build_processor(image_size: int, image_tokens: int) -> JanusProcessor:
    tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(special_tokens=SPECIAL_TOKENS),
                                  bos_token=BOS, eos_token=EOS, pad_token=PAD, add_bos_token=True,
                                  extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})
    images = JanusImageProcessorPil(size={"height": image_size, "width": image_size})
    return JanusProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                          use_default_system_prompt=True, num_image_tokens=image_tokens)


def random_model(name: str, processor: JanusProcessor, seed: int) -> JanusForConditionalGeneration:
    tok = processor.tokenizer
    ids = TokenIds(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id,
                   image=tok.convert_tokens_to_ids(IMAGE))
    cfg = janus_config(name, ids, vocab_size=len(tok) if name == "tiny" else None)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval().requires_grad_(False)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, do_sample=True,
        temperature=GENERATION_DEFAULTS.temperature, guidance_scale=GENERATION_DEFAULTS.cfg_weight,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(BOI)})
    return model


def save_random_checkpoint(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    folder = Path(folder)
    arch = ARCHS[name]
    processor = build_processor(arch.image_size, arch.image_tokens)
    random_model(name, processor, seed).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
