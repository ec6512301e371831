"""The stages every SD-UNet flow pipeline shares, step by step: `begin` encodes text, draws noise and encodes
edits; `finish` decodes; a subclass writes out where each row starts (`start`) and its sampling step (`step`).

With `enable_lora`, each row runs its own `ImageSpec.lora` adapters (issue #34, `lora.rows`): its prompts encoded
with their text-encoder layers, its UNet adapters pinned from `begin` until it leaves the running batch and bound
before every forward (`bind_lora`, which a subclass's `step` calls just before the denoiser)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rfserve.model_zoo.base import ImageSpec, StageTimer
from rfserve.model_zoo.edits import EditLatents, edit_latents
from rfserve.model_zoo.fast_path import CompiledCalls, sd_fast_path
from rfserve.model_zoo.latent_rows import LatentRows
from rfserve.model_zoo.lora.pipeline import LoraPipeline
from rfserve.model_zoo.running import Running
from rfserve.model_zoo.samplers import straight_ahead
from rfserve.model_zoo.sd_components import SDComponents
from rfserve.model_zoo.seeding import initial_noise
from rfserve.model_zoo.text_cache import TextEncoderCache


class SDFlowPipeline(LoraPipeline, LatentRows):
    family = ""
    init_noise_sigma = 1.0

    def __init__(self, parts: SDComponents):
        self.parts = parts
        self.text = TextEncoderCache(self._encode_plain)

    def lora_modules(self) -> tuple[str, nn.Module, nn.Module | None]:
        return "unet", self.parts.unet, self.parts.text_encoder

    def _encode_plain(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        if self.adapters is None:
            return self.parts.encode_text(prompts)
        return self.adapters.encoder(self.parts.encode_text)(prompts)

    def encode_prompts(self, prompts: list[str], specs: list[ImageSpec]) -> tuple[torch.Tensor, list[bool]]:
        """Each row's prompt encoded with the text-encoder layers of its own adapters bound (cached per prompt
        and adapter choice); rows whose adapters leave the text encoder alone share the plain prompts' cache."""
        variants = [None if self.adapters is None else self.adapters.text_variant(s.lora) for s in specs]
        if all(v is None for v in variants):
            return self.text.encode(prompts)
        groups: dict = {}
        for i, v in enumerate(variants):
            groups.setdefault(v, []).append(i)
        embs, flags, order = [], [], []
        for v, rows in groups.items():
            encoder = None if v is None else self.adapters.encoder(
                self.parts.encode_text, self.adapters.text_choice(specs[rows[0]].lora))
            emb, truncated = self.text.encode([prompts[i] for i in rows], v, encoder)
            embs.append(emb)
            flags += truncated
            order += rows
        where = {row: k for k, row in enumerate(order)}
        pick = [where[i] for i in range(len(specs))]
        return torch.cat(embs)[pick], [flags[k] for k in pick]

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.parts.unet.config.sample_size * self.parts.vae_scale_factor
        return side, side

    def start(self, specs: list[ImageSpec], noise: torch.Tensor, edit: EditLatents | None
              ) -> tuple[torch.Tensor, list[int], dict]:
        """Where each row's flow starts from its noise (an edit: part-way along it), how many steps it takes,
        and the family's own per-row schedule (entries of `Running.rows`)."""
        raise NotImplementedError

    def ahead(self, running: Running) -> list[float]:
        """Per row, the progress its flow has left over the progress of its last step: how far `preview`
        continues that step in a straight line."""
        raise NotImplementedError

    def begin(self, specs: list[ImageSpec]) -> Running:
        """Rows x (B, C, h, w), emb and neg (B, L, D): every row's prompt and negative prompt, the latter read
        only by the rows that use guidance."""
        timings: dict[str, float] = {}
        timer, p, first = StageTimer(self.parts.synchronize, timings), self.parts, specs[0]
        with timer.stage("encode"):
            self.check_lora(specs)
            emb, truncated = self.encode_prompts([s.prompt for s in specs], specs)
            neg, _ = self.encode_prompts([s.negative_prompt for s in specs], specs)
            noise = initial_noise([s.seed for s in specs], p.latent_shape(first.width, first.height),
                                  dtype=p.dtype, device=p.device)
            edit = edit_latents(specs, p.vae, noise)
            x, steps, rows = self.start(specs, noise * self.init_noise_sigma, edit)
        rows.update(x=x, prev=x, emb=emb, neg=neg)
        self.pin_lora(specs, rows)
        if edit is not None:
            rows["edit"] = edit
        return Running(specs, truncated, steps, rows, timings=timings, sync=self.parts.synchronize)

    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        """The picture each row's last step points at: that step continued in a straight line to the end,
        decoded (the tiny VAE when one is given), composited for a masked edit."""
        ahead = self.ahead(running)
        clean = straight_ahead(running.rows["prev"], running.rows["x"], rows, [ahead[i] for i in rows])
        return self.shown(running, clean, rows)

    def kept_prompt(self, prompt: str) -> str:
        """The part of an over-long prompt the text encoder actually reads."""
        return self.parts.tokenizer.decode(self._read_ids(prompt), skip_special_tokens=True)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self._read_ids(prompt))

    def _read_ids(self, prompt: str) -> list[int]:
        return self.parts.tokenizer(prompt, truncation=True, max_length=self.parts.max_tokens).input_ids

    def fast_path(self) -> CompiledCalls:
        return sd_fast_path(self.parts)

    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                 negative_prompts: list[str] | None = None, height: int | None = None,
                 width: int | None = None):
        """Convenience for scripts and evaluation: uint8 (B, H, W, 3)."""
        w0, h0 = self.default_size
        negs = negative_prompts or [""] * len(prompts)
        specs = [ImageSpec(p, n, s, width or w0, height or h0, steps, guidance)
                 for p, n, s in zip(prompts, negs, seeds)]
        return self.run(specs).images
