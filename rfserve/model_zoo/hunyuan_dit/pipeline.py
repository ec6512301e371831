"""Hunyuan-DiT: encode text (BERT + mT5) → sample (a scheduler per image over HunyuanDiT2DModel, CFG rows
beside rows without it) → decode (SDXL VAE), a step at a time (model_zoo.base.Pipeline). Semantics follow
diffusers' HunyuanDiTPipeline; see the reference notes §4.

With `enable_lora`, each row runs its own `ImageSpec.lora` adapters (issue #34, `lora.pipeline`) in the
transformer: pinned from `begin` until the row leaves, bound before every forward. The text encoders take none:
diffusers has no LoRA loader for any Hunyuan-DiT component, and `lora.files` reads its files' "transformer."
layers, so a file with text-encoder layers is refused at registration."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rfserve import kernels
from rfserve.model_zoo.base import ImageSpec, StageTimer
from rfserve.model_zoo.edits import edit_latents
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.hunyuan_dit.components import BERT_TOKENS, HunyuanComponents
from rfserve.model_zoo.hunyuan_dit.geometry import rotary_tables
from rfserve.model_zoo.hunyuan_dit.guidance import guided_prediction
from rfserve.model_zoo.hunyuan_dit.schedulers import clean_estimate, row_schedule, scheduler_name, step_kwargs
from rfserve.model_zoo.hunyuan_dit.text import TextEmbeddings
from rfserve.model_zoo.latent_rows import LatentRows
from rfserve.model_zoo.lora.pipeline import LoraPipeline
from rfserve.model_zoo.running import Running
from rfserve.model_zoo.samplers import guidance_tensor, guided_rows, with_uncond
from rfserve.model_zoo.seeding import seeded_noise
from rfserve.model_zoo.text_cache import TextEncoderCache

ORIGINAL_SIZE = (1024, 1024)   # HunyuanDiTPipeline's default `original_size`
CROP_TOP_LEFT = (0, 0)
STYLE = 0                      # the single learned style of v≤1.1


class HunyuanPipeline(LoraPipeline, LatentRows):
    """A running batch's rows (`Running.rows`): `x` the latents (B, C, h, w); `x_t` and `pred`, the latents the
    last step started from and its guided prediction, for previews; `text` and `neg`, the prompts' and negative
    prompts' `TextEmbeddings`; per row its own `scheduler` (they carry step state), the `timesteps` it runs and
    its `generator` (DDPM draws variance noise at every step); `edit`, `EditLatents`, for edits; and `lora`, the
    rows' pinned adapters, once LoRA is enabled."""
    family = "hunyuan-dit"

    def __init__(self, parts: HunyuanComponents, scheduler: str | None = None, guidance_rescale: float = 0.0,
                 attention_backend: str = "auto"):
        self.parts = parts
        self.scheduler = scheduler_name(parts.scheduler_config, scheduler)
        self.guidance_rescale = guidance_rescale
        # A real entry is about 1.2 MB in bf16, so the cache stays small.
        self.text = TextEncoderCache(parts.encode_text, capacity=64, row=TextEmbeddings.row,
                                     cat=TextEmbeddings.cat)
        kernels.install_attention(parts.transformer, backend=attention_backend)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, variant: str | None = None,
                        **kwargs) -> "HunyuanPipeline":
        return cls(HunyuanComponents.load(Path(path), device=device, dtype=dtype, variant=variant), **kwargs)

    def lora_modules(self) -> tuple[str, nn.Module, nn.Module | None]:
        return "transformer", self.parts.transformer, None

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.parts.transformer.config.sample_size * self.parts.vae_scale_factor
        return side, side

    def conditioning(self, text: TextEmbeddings, width: int, height: int) -> dict:
        """Transformer inputs besides latents and timestep, for a forward's rows (`text`'s, unconditional copies
        included). Style and image-size tensors only where the checkpoint was trained with them (v≤1.1)."""
        p, dit, n = self.parts, self.parts.transformer, text.bert.shape[0]
        cond = text.transformer_kwargs()
        cond["image_rotary_emb"] = rotary_tables(width, height, dit.inner_dim // dit.num_heads,
                                                 dit.config.patch_size, p.vae_scale_factor, p.device)
        if p.uses_style_and_size:
            meta = torch.tensor([ORIGINAL_SIZE + (height, width) + CROP_TOP_LEFT], dtype=text.bert.dtype)
            cond["image_meta_size"] = meta.to(p.device).repeat(n, 1)                       # (n, 6)
            cond["style"] = torch.full((n,), STYLE, dtype=torch.long, device=p.device)
        return cond

    @torch.inference_mode()
    def begin(self, specs: list[ImageSpec]) -> Running:
        """Each row's text, noise, edit input and scheduler. A row runs its own schedule: an edit the last
        `run_steps` timesteps of it, from the scheduler's `add_noise` of its input (as diffusers' img2img); at
        strength 1 from noise, as text-to-image."""
        first, p = specs[0], self.parts
        if first.width % 16 or first.height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {first.width}x{first.height}")
        timings: dict[str, float] = {}
        with StageTimer(p.synchronize, timings).stage("encode"):
            self.check_lora(specs)
            text, truncated = self.text.encode([s.prompt for s in specs])
            # A row without guidance has no unconditional branch (`with_uncond`): its own text stands in, unread.
            neg = text if not any(s.uses_cfg for s in specs) else \
                self.text.encode([s.negative_prompt if s.uses_cfg else s.prompt for s in specs])[0]
            noise, generators = seeded_noise([s.seed for s in specs], p.latent_shape(first.width, first.height),
                                             dtype=p.dtype, device=p.device)
            edit = edit_latents(specs, p.vae, noise)
            schedules = [row_schedule(self.scheduler, p.scheduler_config, s.steps, s.strength, p.device)
                         for s in specs]
            starts = []
            for i, (scheduler, timesteps, part) in enumerate(schedules):
                if not part:
                    starts.append(noise[i:i + 1] * scheduler.init_noise_sigma)
                elif len(timesteps):
                    starts.append(scheduler.add_noise(edit.data[i:i + 1], noise[i:i + 1], timesteps[:1]))
                else:
                    starts.append(edit.data[i:i + 1])                  # strength ~0: the input, through the VAE
            x = torch.cat(starts)                                          # (B, C, h, w)
        rows = dict(x=x, x_t=x, pred=torch.zeros_like(x), text=text, neg=neg, generator=generators,
                    scheduler=[s for s, _, _ in schedules], timesteps=[t for _, t, _ in schedules])
        if edit is not None:
            rows["edit"] = edit
        self.pin_lora(specs, rows)
        return Running(list(specs), truncated, [len(t) for _, t, _ in schedules], rows, timings=timings,
                       sync=p.synchronize)

    @torch.inference_mode()
    def step(self, running: Running) -> None:
        """One forward for every row, each at its own timestep with its own text; only rows with guidance
        (> 1, as the reference's `do_classifier_free_guidance`) get an unconditional branch, guided with their
        own scale and the pipeline's rescale (per image). Each row then steps with its own scheduler, on its
        own slice, drawing from its own generator, so it computes what it would alone; a masked edit's kept
        area is put back to its input at the row's next timestep, as diffusers' inpainting does."""
        rows, specs, p = running.rows, running.specs, self.parts
        x, schedulers, generators = rows["x"], rows["scheduler"], rows["generator"]
        ts = [timesteps[done] for timesteps, done in zip(rows["timesteps"], running.done)]   # each row's t
        cfg = guided_rows(specs)
        x_in = torch.cat([s.scale_model_input(x[i:i + 1], t) for i, (s, t) in enumerate(zip(schedulers, ts))])
        t_in = torch.stack(ts).to(x.dtype)                                  # (B,): the reference's t_expand
        cond = self.conditioning(rows["text"].with_uncond(cfg, rows["neg"]), specs[0].width, specs[0].height)
        self.bind_lora(running, cfg)
        out = p.denoiser(with_uncond(x_in, cfg), with_uncond(t_in, cfg), **cond,
                         return_dict=False)[0]                              # (len(cfg) + B, 2C, h, w)
        if p.transformer.config.learn_sigma:
            out = out.chunk(2, dim=1)[0]                                    # (len(cfg) + B, C, h, w)
        pred = out[len(cfg):].clone()                                       # (B, C, h, w)
        if cfg:
            both = torch.cat([out[:len(cfg)], pred[cfg]])                   # (2·len(cfg), ...), uncond first
            scales = guidance_tensor([specs[i].guidance for i in cfg], x.device)
            pred[cfg] = guided_prediction(both, scales, self.guidance_rescale)
        new = torch.cat([s.step(pred[i:i + 1], t, x[i:i + 1], **step_kwargs(s, [generators[i]]),
                                return_dict=False)[0]
                         for i, (s, t) in enumerate(zip(schedulers, ts))])  # (B, C, h, w)
        if "edit" in rows:
            new = rows["edit"].hold(new, lambda data, noise: torch.cat([
                self._noised(running, i, data[i:i + 1], noise[i:i + 1]) for i in range(len(running))]))
        rows.update(x=new, x_t=x, pred=pred)
        running.advance()

    @staticmethod
    def _noised(running: Running, i: int, data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Row i's input where its flow stands after the step it is taking: at its next timestep, or clean after
        its last."""
        t_next = running.rows["timesteps"][i][running.done[i] + 1:][:1]
        return running.rows["scheduler"][i].add_noise(data, noise, t_next) if len(t_next) else data

    @torch.inference_mode()
    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        """Each row's x̂₀, decoded and, for a masked edit, composited."""
        latents = torch.cat([self._clean(running, i) for i in rows])     # (len(rows), C, h, w)
        return self.shown(running, latents, rows)

    @staticmethod
    def _clean(running: Running, i: int) -> torch.Tensor:
        """Row i's x̂₀ from its last step's prediction, at that step's timestep of its own schedule; before its
        first step, its starting latent."""
        r, done = running.rows, running.done[i]
        if done == 0:
            return r["x"][i:i + 1]
        return clean_estimate(r["scheduler"][i], r["pred"][i:i + 1], r["timesteps"][i][done - 1], r["x_t"][i:i + 1])

    def fast_path(self) -> CompiledCalls:
        """The transformer compiled per (batch, size) bucket. The RoPE tables are the same tensors for every
        call at a size (`rotary_tables` is cached), and the conditioning has fixed shapes per bucket (77 BERT
        and 256 mT5 tokens), so one graph serves each bucket."""
        return CompiledCalls([(self.parts, "denoiser")], pads=True)

    def kept_prompt(self, prompt: str) -> str:
        """What the shorter encoder (BERT, 77 tokens) reads of an over-long prompt."""
        return self.parts.tokenizer.decode(self._read_ids(prompt), skip_special_tokens=True)

    def prompt_tokens(self, prompt: str) -> int:
        """Counted as BERT reads the prompt (mT5 reads the same text, in up to 256 tokens)."""
        return len(self._read_ids(prompt))

    def _read_ids(self, prompt: str) -> list[int]:
        return self.parts.tokenizer(prompt, truncation=True, max_length=BERT_TOKENS).input_ids
