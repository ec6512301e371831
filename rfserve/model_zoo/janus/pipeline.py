"""Janus / Janus-Pro text-to-image: the image's VQ tokens generated autoregressively, for a batch at once.

Semantics are transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`, which follows
the official demo:
- the prompt is the checkpoint's chat template for one user turn plus the generation prompt, then BOI
  (`JanusProcessor(generation_mode="image")`); the tokenizer adds BOS;
- rows are [cond B; uncond B]; an unconditional row is its prompt with every token but BOS and BOI replaced
  by the pad token, with the same attention mask;
- G tokens (576 for 384²), each from the generation head's logits of the last position, guided
  u + (c − u)·w, then greedy or sampled at temperature T; the next input is the token's generation embedding
  (`prepare_embeddings_for_image_generation`), fed to both rows of its prompt;
- the VQ decoder turns the G tokens into pixels; clip(−1, 1) → (x+1)/2·255, truncated, as the official code.

Where we differ, exactly:
- Prompts are right-padded (transformers pads left), to a multiple of PREFIX_BUCKET tokens so that the token
  step has one shape per bucket of prompt lengths (its compiled graph, `fast_path`): each row has its own RoPE
  positions and its padding is masked, so the logits are the same up to float rounding (RoPE sees only
  relative positions).
- The KV cache is ours: a (2B, kv_heads, P + G, d) buffer per layer written in place, taken from the
  pipeline's `KVPool` (`model_zoo.janusflow.llm`) at fixed addresses, as transformers' static cache is, but
  one whose rows we can drop when a request leaves between tokens. Every step attends over the buffer's full
  width under a mask, so its shapes never change (the benchmark compares it with `generate()` on its StaticCache).
- With sampling, each row draws from its own seeded generator (`model_zoo.janus.sampling`), so an image is
  the same alone or in any batch; `generate()` draws the whole batch from the global RNG.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import cast

import numpy as np
import torch
from transformers import LlamaForCausalLM

from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer, between_steps
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.janus.loading import JanusParts, load_parts
from rfserve.model_zoo.janus.sampling import guided_logits, next_tokens
from rfserve.model_zoo.janusflow.llm import T2I_PREFIX_TOKENS, KVBuffers, KVPool, LlamaBody, run_layers
from rfserve.model_zoo.samplers import guidance_tensor, keep_rows
from rfserve.model_zoo.seeding import generators


# Prompts are padded to a multiple of this: the token step's shapes, and so its compiled graph, depend on the
# padded length only; masked columns add exact zeros to attention.
PREFIX_BUCKET = 64


class JanusPipeline:
    family = "janus"

    def __init__(self, parts: JanusParts, temperature: float = 1.0):
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        self.parts = parts
        self.temperature = temperature                    # 0 = greedy
        self.lm = cast(LlamaForCausalLM, LlamaBody(parts.model.model.language_model))
        self.kv_pool = KVPool(self.lm, parts.device, parts.dtype)
        self.token_step = self.next_scores       # the hot call, which the fast path swaps for a compiled one

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32,
                        temperature: float = 1.0) -> "JanusPipeline":
        return cls(load_parts(Path(path), device=device, dtype=dtype), temperature)

    @property
    def default_size(self) -> tuple[int, int]:
        return self.parts.image_side, self.parts.image_side

    @cached_property
    def max_prompt_tokens(self) -> int:
        """Room for the prompt text after the template: within the context with the G image tokens, and within
        the prefix the KV plan counts (`T2I_PREFIX_TOKENS`)."""
        template = len(self.chat_ids(""))
        return min(self.parts.context_length - self.parts.num_image_tokens - template, T2I_PREFIX_TOKENS - template)

    def reserve_memory(self, max_batch: int) -> None:
        """The KV pool of `max_batch` images (2 rows each, CFG) at the longest prompt and the G image tokens."""
        longest = len(self.chat_ids("")) + self.max_prompt_tokens
        self.kv_pool.reserve(2 * max_batch, longest + self.parts.num_image_tokens)

    def text_ids(self, prompt: str) -> list[int]:
        return self.parts.tokenizer(prompt, add_special_tokens=False).input_ids

    def chat_ids(self, text: str) -> list[int]:
        """The prompt as the processor builds it for image generation: the checkpoint's chat template for
        one user turn and the generation prompt, then BOI; the tokenizer adds BOS."""
        proc = self.parts.processor
        chat = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                        add_generation_prompt=True)
        return proc(text=chat, generation_mode="image", return_tensors=None).input_ids[0]

    def prompt_ids(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's ids; prompts longer than `max_prompt_tokens` are cut to it."""
        limit = self.max_prompt_tokens
        cuts = [len(self.text_ids(prompt)) > limit for prompt in prompts]
        return [self.chat_ids(self.kept_prompt(p) if cut else p) for p, cut in zip(prompts, cuts)], cuts

    def kept_prompt(self, prompt: str) -> str:
        """The first `max_prompt_tokens` tokens of the prompt, as text."""
        return self.parts.tokenizer.decode(self.text_ids(prompt)[:self.max_prompt_tokens])

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt as the LLM reads it, template, BOS and BOI included."""
        return len(self.prompt_ids([prompt])[0][0])

    def fast_path(self) -> CompiledCalls:
        """The token step (`next_scores`) compiled per (rows, padded prompt) bucket: every step attends over the
        cache's full width under a mask and writes its column through a tensor, so one graph serves all G."""
        return CompiledCalls([(self, "token_step")])

    def next_scores(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KVBuffers,
                    write: torch.Tensor) -> torch.Tensor:
        """The generation head's logits (R, V) after feeding each row its last image token `tokens` (R,) at RoPE
        `positions` (R,), its key and value written at column `write` (R,); `mask` (R, 1, 1, W) the visible keys."""
        model = self.parts.model
        x = model.prepare_embeddings_for_image_generation(tokens[:, None])                  # (R, 1, D)
        h = run_layers(self.lm, x, positions[:, None], kv, write=write, mask=mask)[:, 0]    # (R, D)
        return model.model.generation_head(h)

    def prompt_batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (2B, P) as [cond B; uncond B], right-padded, and the prompts' lengths (2B,)."""
        p, dev, B = self.parts, self.parts.device, len(prompts)
        P = -(-max(len(ids) for ids in prompts) // PREFIX_BUCKET) * PREFIX_BUCKET                 # padded prompt
        ids = torch.full((2 * B, P), p.pad_id, dtype=torch.long)
        for i, row in enumerate(prompts):
            ids[i, :len(row)] = ids[B + i, :len(row)] = torch.tensor(row)
        uncond = ids[B:]
        uncond.masked_fill_(~torch.isin(uncond, torch.tensor(p.keep_ids)), p.pad_id)     # BOS, BOI kept
        lengths = torch.tensor([len(row) for row in prompts] * 2)
        return ids.to(dev), lengths.to(dev)

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], guidance: torch.Tensor | float,
               generators: list[torch.Generator]) -> torch.Tensor:
        """B prompts' token ids → image tokens (B', G) of the rows still kept at the end (B' ≤ B)."""
        p, lm, model = self.parts, self.lm, self.parts.model
        dev, B, G = p.device, len(prompts), p.num_image_tokens
        ids, lengths = self.prompt_batch(prompts)                                   # (R, P), (R,)
        R, P = ids.shape
        col = torch.arange(P + G, device=dev)
        visible = col[None, :] < lengths[:, None]                                   # (R, P+G): prompt keys
        kv = self.kv_pool.batch(R, P + G)
        causal = torch.ones(P, P + G, dtype=torch.bool, device=dev).tril()
        h = run_layers(lm, model.get_input_embeddings()(ids), col[:P].expand(R, P), kv, write=0,
                       mask=causal[None, None] & visible[:, None, None, :])          # (R, P, D)
        h = h[torch.arange(R, device=dev), lengths - 1]                             # (R, D): each last token
        logits = model.model.generation_head(h)                                     # (R, V)

        tokens = torch.zeros(B, G, dtype=torch.long, device=dev)
        for i in range(G):
            scores = guided_logits(logits, guidance)                                # (B, V)
            tokens[:, i] = next_tokens(scores, self.temperature, generators)
            keep = between_steps(lambda rows, n=i + 1: self.decode(self.preview_tokens(tokens[rows], n)), G)
            if keep is not None:
                pairs = keep + [len(tokens) + k for k in keep]                      # [cond; uncond] rows kept
                tokens, guidance = tokens[keep], keep_rows(keep, guidance)
                generators = [generators[k] for k in keep]
                lengths, visible, kv = lengths[pairs], visible[pairs], self.kv_pool.keep(kv, pairs)
            if i == G - 1 or not len(tokens):
                break
            visible[:, P + i] = True
            logits = self.token_step(tokens[:, i].repeat(2), lengths + i, visible[:, None, None, :], kv,
                                     torch.full_like(lengths, P + i))                 # (R, V)
        return tokens

    def preview_tokens(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """A full grid from the first n tokens: the rest repeat the n-th. The VQ decoder needs every cell;
        the raster's last token is the best guess for what follows it, and keeps the unfinished part of the
        preview in the colours generated so far rather than one arbitrary codebook entry."""
        G = tokens.shape[1]
        return torch.cat([tokens[:, :n], tokens[:, n - 1:n].expand(-1, G - n)], dim=1)      # (b, G)

    @torch.inference_mode()
    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, G) → pixels (B, H, W, 3) in [−1, 1], float32."""
        return self.parts.model.decode_image_tokens(tokens).float().clip(-1.0, 1.0)

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        return ((self.decode_pixels(tokens) + 1) / 2 * 255).cpu().numpy().astype(np.uint8)

    def run(self, specs: list[ImageSpec]) -> BatchOutput:
        timer = StageTimer(sync=self.parts.synchronize)
        with timer.stage("encode"):
            prompts, truncated = self.prompt_ids([s.prompt for s in specs])
            guidance = guidance_tensor([s.guidance for s in specs], self.parts.device)
        with timer.stage("sample"):
            tokens = self.sample(prompts, guidance, generators([s.seed for s in specs]))
        with timer.stage("decode"):
            images = self.decode(tokens) if len(tokens) else np.zeros((0, *self.default_size, 3), np.uint8)
        return BatchOutput(images, truncated, timer.timings)
