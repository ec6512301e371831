"""Janus / Janus-Pro chat: images and text in, text out, on the same continuous batcher as JanusFlow.

The prompt is what `JanusProcessor` makes for `generate()`:
- the checkpoint's own chat template over the turns, with the generation prompt;
- the processor's default system prompt in front when the checkpoint asks for it
  (`use_default_system_prompt`), or the request's own system message in its place;
- BOS from the tokenizer, and each `<image_placeholder>` expanded to BOI + G image tokens + EOI.
`JanusModel` writes each image's aligned SigLIP features over its G image-token positions. Decoding is the
language model's text head over our paged KV cache (`model_zoo.janusflow.decoder.PagedDecoder`), so streaming,
stop strings, seeds and usage are those of every chat model here.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from rfserve.model_zoo.base import ChatPrompt
from rfserve.model_zoo.janus.loading import JanusParts
from rfserve.model_zoo.janusflow.decoder import PagedDecoder
from rfserve.model_zoo.janusflow.llm import LlamaBody
from rfserve.model_zoo.paged_kv import llm_bytes_per_token

ROLES = {"User": "user", "Assistant": "assistant"}


class JanusChatProcessor:
    """The `ChatProcessor` (model_zoo.base) of a Janus checkpoint."""

    def __init__(self, parts: JanusParts):
        proc, tok = parts.processor, parts.tokenizer
        self.processor, self.tokenizer = proc, tok
        self.eos_id = tok.eos_token_id
        self.image_tag = proc.image_token
        self.image_id = tok.convert_tokens_to_ids(proc.image_token)
        self.start_id, self.end_id = (tok.convert_tokens_to_ids(t) for t in (proc.image_start_token,
                                                                              proc.image_end_token))
        self.num_image_tokens = proc.num_image_tokens
        # The processor's own default: it prepends this to every text prompt when the checkpoint says so.
        self.default_system = DEFAULT_SYSTEM_PROMPT if proc.use_default_system_prompt else ""
        self._reserved = tuple(dict.fromkeys(
            [*tok.all_special_tokens, proc.image_token, proc.image_start_token, proc.image_end_token]))

    def reserved_in(self, text: str) -> str | None:
        return next((t for t in self._reserved if t and t in text), None)

    def prompt(self, turns: list[tuple[str, str]], system: str, images: list[Image.Image]) -> ChatPrompt:
        messages: Any = [{"role": ROLES[role], "content": _parts(text, self.image_tag)} for role, text in turns]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if system:
            chat = system.rstrip("\n") + "\n\n" + chat          # as the default one sits: then a blank line
        ids: list[int] = []
        positions: list[int] = []
        for tok in self.tokenizer(chat).input_ids:              # BOS first, as the processor's tokenizer adds it
            if tok != self.image_id:
                ids.append(tok)
                continue
            ids.append(self.start_id)
            positions += range(len(ids), len(ids) + self.num_image_tokens)
            ids += [self.image_id] * self.num_image_tokens + [self.end_id]
        pixels = self.processor.image_processor(images, return_tensors="pt").pixel_values if images else None
        return ChatPrompt(ids, positions, pixels)


def _parts(text: str, tag: str) -> list[dict]:
    """A turn's text as the template's content parts: each image tag an image part, in place."""
    parts: list[dict] = []
    for k, piece in enumerate(text.split(tag)):
        if k:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


class JanusChat:
    """Janus's `ChatParts` (model_zoo.base)."""

    def __init__(self, parts: JanusParts):
        self.parts = parts
        self._processor = JanusChatProcessor(parts)

    @property
    def processor(self) -> JanusChatProcessor:
        return self._processor

    @property
    def tokenizer(self):
        return self.parts.tokenizer

    @property
    def context_length(self) -> int:
        return self.parts.context_length

    @property
    def kv_bytes_per_token(self) -> int:
        return llm_bytes_per_token(self.parts.model.model.language_model.config, self.parts.dtype)

    def decoder(self, slots: int, max_len: int, num_blocks: int | None = None) -> PagedDecoder:
        p = self.parts
        return PagedDecoder(LlamaBody(p.model.model.language_model), p.model.lm_head, self.embed_prompt, p.device,
                            p.dtype, slots, max_len, num_blocks)

    def embed_prompt(self, ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_positions: torch.Tensor) -> torch.Tensor:
        """Text embeddings (L, D) with the images' aligned features written over their image tokens."""
        model = self.parts.model.model
        embeds = model.get_input_embeddings()(ids)                                   # (L, D)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        features = model.get_image_features(pixel_values).pooler_output             # (n, G, D)
        embeds = embeds.clone()
        embeds[image_positions] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds
