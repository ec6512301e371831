"""The three stages every SD-UNet flow pipeline shares: encode text → sample → decode.
Subclasses write out only their sampling loop."""
from __future__ import annotations

import torch

from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer
from rfserve.model_zoo.edits import EditLatents, composite, edit_latents
from rfserve.model_zoo.fast_path import CompiledCalls, sd_fast_path
from rfserve.model_zoo.samplers import guidance_tensor
from rfserve.model_zoo.sd_components import SDComponents, to_uint8
from rfserve.model_zoo.seeding import initial_noise
from rfserve.model_zoo.text_cache import TextEncoderCache


class SDFlowPipeline:
    family = ""
    init_noise_sigma = 1.0

    def __init__(self, parts: SDComponents):
        self.parts = parts
        self.text = TextEncoderCache(parts.encode_text)

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.parts.unet.config.sample_size * self.parts.vae_scale_factor
        return side, side

    def sample(self, x: torch.Tensor, emb: torch.Tensor, steps: int, guidance: torch.Tensor | float | None,
               edit: EditLatents | None = None) -> torch.Tensor:
        """The flow from noise `x` (or, for an edit, from part-way along it) to latents."""
        raise NotImplementedError

    def preview(self, latents: torch.Tensor, edit: EditLatents | None, rows: list[int]):
        """The picture a clean-latent estimate of `rows` shows: decoded (the tiny VAE when one is given),
        composited for a masked edit, as uint8 (len(rows), H, W, 3)."""
        return to_uint8(composite(edit, self.parts.decode(latents), rows))[0]

    def images(self, specs: list[ImageSpec], timer: StageTimer | None = None):
        """Float images (B, 3, H, W) in [0, 1] and per-image prompt-truncation flags."""
        timer = timer or StageTimer()
        first, p = specs[0], self.parts
        with timer.stage("encode"):
            emb, truncated = self.text.encode([s.prompt for s in specs])
            guidance = None
            if first.uses_cfg:
                neg, _ = self.text.encode([s.negative_prompt for s in specs])
                emb = torch.cat([neg, emb])                      # (2B, L, D), negative first
                guidance = guidance_tensor([s.guidance for s in specs], p.device)
        with timer.stage("encode"):
            noise = initial_noise([s.seed for s in specs], p.latent_shape(first.width, first.height),
                                  dtype=p.dtype, device=p.device)
            edit = edit_latents(specs, p.vae, noise)
        with timer.stage("sample"):
            latents = self.sample(noise * self.init_noise_sigma, emb, first.steps, guidance, edit)
        with timer.stage("decode"):
            images = p.decode(latents)
        return composite(edit, images), truncated

    def run(self, specs: list[ImageSpec]) -> BatchOutput:
        return self.run_timed(specs, StageTimer(sync=self.parts.synchronize))

    def run_timed(self, specs: list[ImageSpec], timer: StageTimer) -> BatchOutput:
        images, truncated = self.images(specs, timer)
        with timer.stage("decode"):
            pixels, on_device = to_uint8(images)
        return BatchOutput(pixels, truncated, timer.timings, on_device)

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
