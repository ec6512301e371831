"""Janus / Janus-Pro text-to-image: the image's VQ tokens generated autoregressively, one token of every image a
step, so that images join and leave a running batch between tokens (model_zoo.base.Pipeline).

Semantics are transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`, which follows
the official demo:
- the prompt is the checkpoint's chat template for one user turn plus the generation prompt, then BOI
  (`JanusProcessor(generation_mode="image")`); the tokenizer adds BOS;
- a guided image has two rows, cond and uncond; an unconditional row is its prompt with every token but BOS
  and BOI replaced by the pad token, with the same attention mask;
- G tokens (576 for 384²), each from the generation head's logits of the last position, guided
  u + (c − u)·w, then greedy or sampled at temperature T; the next input is the token's generation embedding
  (`prepare_embeddings_for_image_generation`), fed to both rows of its prompt;
- the VQ decoder turns the G tokens into pixels; clip(−1, 1) → (x+1)/2·255, truncated, as the official code.

Where we differ, exactly:
- Every image is its own sequence: its own prompt length, token count so far, guidance weight and generator,
  so it makes the same tokens whichever images share its steps. An image whose weight is at most 1 runs no
  unconditional row and takes its conditional logits as they are (`generate()` adds CFG only above 1, and
  takes one weight for the whole batch).
- Prompts are right-padded (transformers pads left), to a multiple of PREFIX_BUCKET tokens, and image token i
  of a prompt of L tokens sits at RoPE position and cache column L + i, right after it. The cache is as wide as
  the widest image's padded prompt plus G, so the token step has one shape per (rows, bucket of prompt lengths)
  (its compiled graph, `fast_path`); each row sees its own columns up to its token under a mask, so the logits
  are the same up to float rounding (RoPE sees only relative positions).
- The KV cache is ours: a (K, kv_heads, W, d) buffer per layer written in place, taken from the pipeline's
  `KVPool` (`model_zoo.janusflow.llm`) at fixed addresses, as transformers' static cache is, but one that is
  laid out again when images leave or join between tokens (`PromptKV`). Every step attends over the buffer's
  full width under a mask, so its shapes never change (the benchmark compares it with `generate()` on its
  StaticCache).
- With sampling, each image draws from its own seeded generator (`model_zoo.janus.sampling`), so an image is
  the same alone or in any batch; `generate()` draws the whole batch from the global RNG.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import LlamaForCausalLM

from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.janus.loading import JanusParts, load_parts
from rfserve.model_zoo.janus.sampling import guided_scores, next_tokens
from rfserve.model_zoo.janusflow.llm import T2I_PREFIX_TOKENS, KVBuffers, KVPool, LlamaBody, run_layers
from rfserve.model_zoo.running import Running, Stepped
from rfserve.model_zoo.samplers import guided_rows
from rfserve.model_zoo.seeding import generators


# Prompts are padded to a multiple of this: the token step's shapes, and so its compiled graph, depend on the
# padded length only; masked columns add exact zeros to attention.
PREFIX_BUCKET = 64


def padded(length: int) -> int:
    return -(-length // PREFIX_BUCKET) * PREFIX_BUCKET


class JanusPipeline(Stepped):
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
        """The KV pool of `max_batch` images (2 rows each, CFG) at the longest prompt, padded to its bucket, and
        the G image tokens: the widest cache any batch of them is laid out in (`PromptKV`)."""
        longest = len(self.chat_ids("")) + self.max_prompt_tokens
        self.kv_pool.reserve(2 * max_batch, padded(longest) + self.parts.num_image_tokens)

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
        """The token step (`next_scores`) compiled per (KV rows, cache width) bucket: every step attends over the
        cache's full width under a mask and writes each row's column through a tensor, so one graph serves every
        token of every image, wherever each stands, and an image joining never compiles."""
        return CompiledCalls([(self, "token_step")])

    def next_scores(self, tokens: torch.Tensor, columns: torch.Tensor, kv: KVBuffers) -> torch.Tensor:
        """The generation head's logits (K, V) after feeding each KV row its image's last token `tokens` (K,) at
        `columns` (K,), both its RoPE position and the cache column its key and value go to; it sees the columns
        up to its own: its prompt, its image's tokens so far and this one."""
        model = self.parts.model
        visible = torch.arange(kv.keys[0].shape[2], device=columns.device) <= columns[:, None]       # (K, W)
        x = model.prepare_embeddings_for_image_generation(tokens[:, None])                          # (K, 1, D)
        h = run_layers(self.lm, x, columns[:, None], kv, write=columns, mask=visible[:, None, None, :])   # (K, 1, D)
        return model.model.generation_head(h[:, 0])

    def prompt_batch(self, prompts: list[list[int]], guided: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV rows of `prompts` as `PromptKV.fresh` orders them, [every prompt; the `guided` ones unconditional]:
        ids (K, P) right-padded to the longest, bucketed, and each row's prompt length (K,)."""
        p, dev, B = self.parts, self.parts.device, len(prompts)
        rows = [*prompts, *(prompts[i] for i in guided)]
        ids = torch.full((len(rows), padded(max(len(row) for row in rows))), p.pad_id, dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, :len(row)] = torch.tensor(row)
        uncond = ids[B:]
        uncond.masked_fill_(~torch.isin(uncond, torch.tensor(p.keep_ids)), p.pad_id)     # BOS, BOI kept
        return ids.to(dev), torch.tensor([len(row) for row in rows], device=dev)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, kv: KVBuffers) -> torch.Tensor:
        """Prompts `ids` (K, P) of `lengths` (K,) written into columns [0, P) of `kv`'s K rows; the generation
        head's logits (K, V) after each prompt's last token, which the image's first token comes from."""
        model, dev = self.parts.model, self.parts.device
        K, P = ids.shape
        col = torch.arange(P, device=dev)
        seen = (col[None, :] <= col[:, None])[None] & (col[None, :] < lengths[:, None])[:, None, :]  # (K, P, P)
        h = run_layers(self.lm, model.get_input_embeddings()(ids), col.expand(K, P), kv, write=0,
                       mask=seen[:, None])                                                       # (K, P, D)
        return model.model.generation_head(h[torch.arange(K, device=dev), lengths - 1])

    def begin(self, specs: list[ImageSpec]) -> Running:
        """An empty batch that `specs` join: beginning and joining are one path."""
        p = self.parts
        rows = {"tokens": torch.zeros(0, p.num_image_tokens, dtype=torch.long, device=p.device),
                "scores": torch.zeros(0, cast(Any, p.model.config.vq_config).num_embeddings, device=p.device),
                "columns": torch.zeros(0, dtype=torch.long, device=p.device),
                "guidance": torch.zeros(0, device=p.device), "generators": [],
                "kv": PromptKV.fresh(self.kv_pool, [], [])}
        running = Running([], [], [], rows, sync=p.synchronize)
        self.admit(running, specs)
        return running

    @torch.inference_mode()
    def admit(self, running: Running, specs: list[ImageSpec]) -> None:
        """The specs' prompts written into KV rows after the batch's (the cache laid out again, wider if a prompt
        needs it), and each one's scores for its first token, which it takes with the batch's next step. When
        that fails, the batch is left as it was, as the worker expects of a join.

        Rows of `running.rows`: tokens (B, G), filled up to each image's `done`; scores (B, V), float32, what
        its next token is drawn from; columns (B,), where its next token goes (prompt length + tokens fed);
        guidance (B,); generators, one per image; kv, the `PromptKV`."""
        if not specs:
            return
        dev, G = self.parts.device, self.parts.num_image_tokens
        with running.stage("encode"):
            prompts, truncated = self.prompt_ids([s.prompt for s in specs])
            ids, lengths = self.prompt_batch(prompts, guided_rows(specs))                       # (K', P), (K',)
        with running.stage("sample"):
            fresh = PromptKV.fresh(self.kv_pool, [s.uses_cfg for s in specs], [padded(len(i)) + G for i in prompts])
            guidance = torch.tensor([s.guidance for s in specs], dtype=torch.float32, device=dev)
            n, k = len(running), len(running.rows["kv"].owner)              # images and KV rows already running
            try:
                running.extend(Running(list(specs), truncated, [G] * len(specs), {
                    "tokens": torch.zeros(len(specs), G, dtype=torch.long, device=dev),
                    "scores": torch.empty(len(specs), running.rows["scores"].shape[1], device=dev),  # filled below
                    "columns": lengths[:len(specs)], "guidance": guidance,
                    "generators": generators([s.seed for s in specs]), "kv": fresh}))
                state: PromptKV = running.rows["kv"]
                assert state.kv is not None
                logits = self.prefill(ids, lengths, state.kv.rows(len(state.owner), k))         # (K', V)
                running.rows["scores"][n:] = guided_scores(logits, *fresh.index[:3], guidance)
            except BaseException:
                running.keep(list(range(n)))      # the batch as it was: the worker retries or fails the joiners
                raise

    @torch.inference_mode()
    def step(self, running: Running) -> None:
        """Every image's next token, drawn from its scores; then, unless each has just drawn its last, one token
        step over every KV row (an image just finished included: the batch keeps its shape) for the scores of
        the token after."""
        rows, state = running.rows, running.rows["kv"]
        tokens = next_tokens(rows["scores"], self.temperature, rows["generators"])                    # (B,)
        at = torch.tensor(running.done, device=tokens.device)
        rows["tokens"][torch.arange(len(tokens), device=tokens.device), at] = tokens
        if any(done + 1 < steps for done, steps in zip(running.done, running.steps)):
            cond_at, uncond_at, guided, owner = state.index
            logits = self.token_step(tokens[owner], rows["columns"][owner], state.kv)               # (K, V)
            rows["scores"] = guided_scores(logits, cond_at, uncond_at, guided, rows["guidance"])
            rows["columns"] = rows["columns"] + 1
        running.advance()

    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        """Each of `rows` from its own tokens so far (`preview_tokens`); one yet to take a step shows token 0."""
        tokens = running.rows["tokens"]
        grids = [self.preview_tokens(tokens[r:r + 1], max(running.done[r], 1)) for r in rows]
        return self.decode(torch.cat(grids)) if grids else np.zeros((0, *self.default_size, 3), np.uint8)

    def finish(self, running: Running, rows: list[int]) -> BatchOutput:
        timer = StageTimer(sync=self.parts.synchronize)
        with timer.stage("decode"):
            images = self.decode(running.rows["tokens"][rows]) if rows else np.zeros((0, *self.default_size, 3),
                                                                                    np.uint8)
        out = BatchOutput(images, [running.truncated[i] for i in rows], timer.timings)
        running.leave(rows)
        return out

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


class PromptKV:
    """A running batch's KV cache (a `running.RowState`): per layer, K rows (K, kv_heads, W, d) at the front of
    the pipeline's `KVPool`, one for each image's prompt and one more for each guided image's unconditional
    prompt, in any order: KV row k belongs to image `owner[k]`, and is its unconditional one if `uncond[k]`. An
    image needs `widths[i]` columns (its padded prompt, then its G tokens); the cache is as wide as the widest.

    Images leaving (`take`) or joining (`join`) lay the cache out again at the pool's front, at the width the
    images now need: the staying rows' columns copied as they are (an image's columns are its prompt then its
    tokens, never moved, so a narrower or wider cache holds them alike), the joiners' rows after them, zeroed,
    for the pipeline's prefill to write. That is one copy of the cache per join or leave, as `KVPool.keep`
    made for leaving rows, and never more memory than the pool reserved at load for `--max-batch` images at the
    longest prompt, beside the copy itself."""

    def __init__(self, pool: KVPool, kv: KVBuffers | None, owner: list[int], uncond: list[bool], widths: list[int]):
        self.pool, self.kv = pool, kv                       # kv: None while no row is laid out
        self.owner, self.uncond, self.widths = owner, uncond, widths

    @classmethod
    def fresh(cls, pool: KVPool, cfg: list[bool], widths: list[int]) -> "PromptKV":
        """Images yet to join: each image's conditional row, then the guided ones' unconditional rows."""
        guided = [i for i, c in enumerate(cfg) if c]
        return cls(pool, None, list(range(len(cfg))) + guided, [False] * len(cfg) + [True] * len(guided), widths)

    def take(self, rows: list[int]) -> "PromptKV":
        if rows == list(range(len(self.widths))):
            return self
        new = {r: i for i, r in enumerate(rows)}
        kept = [k for k, image in enumerate(self.owner) if image in new]
        widths = [self.widths[r] for r in rows]
        return PromptKV(self.pool, self._laid_out(kept, 0, max(widths, default=0)),
                        [new[self.owner[k]] for k in kept], [self.uncond[k] for k in kept], widths)

    def join(self, other: "PromptKV") -> "PromptKV":
        widths = self.widths + other.widths
        kv = self._laid_out(list(range(len(self.owner))), len(other.owner), max(widths))
        return PromptKV(self.pool, kv, self.owner + [i + len(self.widths) for i in other.owner],
                        self.uncond + other.uncond, widths)

    @torch.inference_mode()
    def _laid_out(self, kept: list[int], zeroed: int, width: int) -> KVBuffers | None:
        """The pool's front as len(kept) + `zeroed` rows of `width` columns: this cache's rows `kept`, then zeroed
        rows (`KVPool.lay_out`). None for no rows. In inference mode, as the pool was made: `Running.keep` calls
        it from anywhere."""
        if not kept and not zeroed:
            return None
        return self.pool.lay_out(self.kv, kept, len(kept) + zeroed, width)

    @cached_property
    def index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the device: the KV row of each image's prompt (B,), the unconditional KV rows (n,), the guided
        images they belong to (n,), and the image of every KV row (K,)."""
        cond_at = [0] * len(self.widths)
        uncond_at, guided = [], []
        for k, (image, uncond) in enumerate(zip(self.owner, self.uncond)):
            if uncond:
                uncond_at.append(k)
                guided.append(image)
            else:
                cond_at[image] = k

        def tensor(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=self.pool.device)
        return tensor(cond_at), tensor(uncond_at), tensor(guided), tensor(self.owner)
