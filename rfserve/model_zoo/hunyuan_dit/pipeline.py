"""Hunyuan-DiT: encode text (BERT + mT5) → sample (scheduler loop over HunyuanDiT2DModel with
batched CFG) → decode (SDXL VAE). Semantics follow diffusers' HunyuanDiTPipeline; see the
reference notes §4."""
from __future__ import annotations

from pathlib import Path

import torch

from rfserve import kernels
from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer, between_steps
from rfserve.model_zoo.edits import EditLatents, composite, edit_latents, run_steps
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.hunyuan_dit.components import BERT_TOKENS, HunyuanComponents
from rfserve.model_zoo.hunyuan_dit.geometry import rotary_tables
from rfserve.model_zoo.hunyuan_dit.guidance import guided_prediction
from rfserve.model_zoo.hunyuan_dit.schedulers import clean_estimate, make_scheduler, scheduler_name, step_kwargs
from rfserve.model_zoo.hunyuan_dit.text import TextEmbeddings
from rfserve.model_zoo.samplers import guidance_tensor, keep_rows
from rfserve.model_zoo.sd_components import to_uint8
from rfserve.model_zoo.seeding import seeded_noise
from rfserve.model_zoo.text_cache import TextEncoderCache

ORIGINAL_SIZE = (1024, 1024)   # HunyuanDiTPipeline's default `original_size`
CROP_TOP_LEFT = (0, 0)
STYLE = 0                      # the single learned style of v≤1.1


class HunyuanPipeline:
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

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.parts.transformer.config.sample_size * self.parts.vae_scale_factor
        return side, side

    def conditioning(self, text: TextEmbeddings, width: int, height: int) -> dict:
        """Transformer inputs besides latents and timestep, for a (possibly 2B) batch. Style and
        image-size tensors only where the checkpoint was trained with them (v≤1.1)."""
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
    def sample(self, x: torch.Tensor, cond: dict, steps: int, guidance: torch.Tensor | float | None,
               generators: list[torch.Generator], edit: EditLatents | None = None) -> torch.Tensor:
        """x: (B, C, h, w) noise; `cond` holds (2B, ...) tensors, unconditional first, with guidance. An edit
        runs the schedule's last `run_steps` timesteps from the scheduler's `add_noise` of its input, and a
        mask is held as diffusers' inpainting holds it; at strength 1 it starts from noise, as text-to-image."""
        scheduler = make_scheduler(self.scheduler, self.parts.scheduler_config)
        scheduler.set_timesteps(steps, device=x.device)
        timesteps = scheduler.timesteps
        extra = step_kwargs(scheduler, generators)
        learn_sigma = self.parts.transformer.config.learn_sigma
        if edit is not None and (n := run_steps(len(timesteps), edit.strength)) < len(timesteps):
            begin = len(timesteps) - n
            timesteps = timesteps[begin:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
            x = scheduler.add_noise(edit.data, x, timesteps[:1].repeat(len(x))) if n else edit.data
        else:
            x = x * scheduler.init_noise_sigma
        for i, t in enumerate(timesteps):
            x_in = x if guidance is None else torch.cat([x, x])                # (2B, C, h, w)
            x_in = scheduler.scale_model_input(x_in, t)
            t_in = t.expand(x_in.shape[0]).to(x.dtype)                          # the reference's t_expand
            out = self.parts.denoiser(x_in, t_in, **cond, return_dict=False)[0]      # (2B, 2C, h, w) under CFG
            pred = out.chunk(2, dim=1)[0] if learn_sigma else out              # (2B, C, h, w): variance dropped
            if guidance is not None:
                pred = guided_prediction(pred, guidance, self.guidance_rescale)
            x_t, x = x, scheduler.step(pred, t, x, **extra, return_dict=False)[0]
            if edit is not None:
                t_next = timesteps[i + 1:i + 2]
                x = edit.hold(x, lambda data, noise: scheduler.add_noise(data, noise, t_next.repeat(len(x)))
                              if len(t_next) else data)
            keep = between_steps(lambda rows: self.preview(clean_estimate(scheduler, pred[rows], t, x_t[rows]),
                                                           edit, rows), len(timesteps))
            if keep is not None:
                x, guidance = keep_rows(keep, x), keep_rows(keep, guidance)
                pairs = 1 + (guidance is not None)                                  # (2B, ...) under CFG
                cond = {k: v if k == "image_rotary_emb" else keep_rows(keep, v, pairs) for k, v in cond.items()}
                generators = [generators[k] for k in keep]
                extra = step_kwargs(scheduler, generators)
                if edit is not None:
                    edit.keep(keep)
        return x

    def preview(self, latents: torch.Tensor, edit: EditLatents | None, rows: list[int]):
        """The picture a clean-latent estimate of `rows` shows, as uint8 (len(rows), H, W, 3)."""
        return to_uint8(composite(edit, self.parts.decode(latents), rows))[0]

    def images(self, specs: list[ImageSpec], timer: StageTimer | None = None):
        """Float images (B, 3, H, W) in [0, 1] and per-image prompt-truncation flags."""
        timer = timer or StageTimer()
        first, p = specs[0], self.parts
        if first.width % 16 or first.height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {first.width}x{first.height}")
        with timer.stage("encode"):
            text, truncated = self.text.encode([s.prompt for s in specs])
            guidance = None
            if first.uses_cfg:
                neg, _ = self.text.encode([s.negative_prompt for s in specs])
                text = TextEmbeddings.cat([neg, text])                         # (2B, ...), negative first
                guidance = guidance_tensor([s.guidance for s in specs], p.device)
            cond = self.conditioning(text, first.width, first.height)
        with timer.stage("encode"):
            noise, generators = seeded_noise([s.seed for s in specs], p.latent_shape(first.width, first.height),
                                             dtype=p.dtype, device=p.device)
            edit = edit_latents(specs, p.vae, noise)
        with timer.stage("sample"):
            latents = self.sample(noise, cond, first.steps, guidance, generators, edit)
        with timer.stage("decode"):
            images = p.decode(latents)
        return composite(edit, images), truncated

    def fast_path(self) -> CompiledCalls:
        """The transformer compiled per (batch, size) bucket. The RoPE tables are the same tensors for every
        call at a size (`rotary_tables` is cached), and the conditioning has fixed shapes per bucket (77 BERT
        and 256 mT5 tokens), so one graph serves each bucket."""
        return CompiledCalls([(self.parts, "denoiser")])

    def kept_prompt(self, prompt: str) -> str:
        """What the shorter encoder (BERT, 77 tokens) reads of an over-long prompt."""
        return self.parts.tokenizer.decode(self._read_ids(prompt), skip_special_tokens=True)

    def prompt_tokens(self, prompt: str) -> int:
        """Counted as BERT reads the prompt (mT5 reads the same text, in up to 256 tokens)."""
        return len(self._read_ids(prompt))

    def _read_ids(self, prompt: str) -> list[int]:
        return self.parts.tokenizer(prompt, truncation=True, max_length=BERT_TOKENS).input_ids

    def run(self, specs: list[ImageSpec]) -> BatchOutput:
        timer = StageTimer(sync=self.parts.synchronize)
        images, truncated = self.images(specs, timer)
        with timer.stage("decode"):
            pixels, on_device = to_uint8(images)
        return BatchOutput(pixels, truncated, timer.timings, on_device)
