"""JanusFlow text-to-image: rectified flow *inside* the LLM, with the prompt KV computed once.

Semantics are the official demo's `generate()` (demo/app_janusflow.py, README):
- rows are [conditional B; unconditional B]; an unconditional row keeps only BOS visible,
  and both rows of a prompt put t_emb at that prompt's last-token position, followed by the
  G image tokens (576 for 384² images);
- N Euler steps (30 by default) from noise at t = 0 to t = 1000·(N−1)/N, with t and dt cast to
  the latent dtype as the reference does; CFG v = w·v_c − (w−1)·v_u (w = 2 by default);
- the SDXL VAE decodes z / scaling_factor; pixels are clip(−1, 1) → (x+1)/2·255, truncated.

Where we differ, exactly: the reference runs the whole [prompt | t_emb | image] sequence through
the LLM at every step. Attention is causal, so the prompt's keys and values do not depend on
z or t; we compute them once and run only the 1 + G new tokens per step, writing their KV over
the same buffer columns each step. Prompts of different lengths share a batch by right-padding
the prefix (to a multiple of PREFIX_BUCKET tokens, so that the per-step graph has one shape per
bucket of prompt lengths), masking the padding and giving every row its own RoPE positions.

Noise: image i of a request with seed s draws `torch.randn((1, 4, h, w), dtype=torch.bfloat16,
generator=torch.Generator("cpu").manual_seed(s + i))`, the reference's bf16 CPU draw made
per image, then moves to the device and the pipeline dtype.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rfserve import kernels
from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer, between_steps
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.janusflow.llm import T2I_PREFIX_TOKENS, KVBuffers, KVPool, run_layers
from rfserve.model_zoo.janusflow.loading import JanusFlowParts, load_parts
from rfserve.model_zoo.samplers import guidance_tensor, keep_rows, straight_ahead
from rfserve.model_zoo.seeding import initial_noise

NOISE_DTYPE = torch.bfloat16
# Prefixes are padded to a multiple of this: the step's shapes (and so its compiled graph) depend on the
# padded length only; masked columns add exact zeros to attention.
PREFIX_BUCKET = 64


class JanusFlowPipeline:
    family = "janusflow"

    def __init__(self, parts: JanusFlowParts):
        self.parts = parts
        self.kv_pool = KVPool(parts.model.language_model, parts.device, parts.dtype)
        self.flow_step = self.velocity          # the hot call, which the fast path swaps for a compiled one

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32,
                        base: str | None = None) -> "JanusFlowPipeline":
        return cls(load_parts(Path(path), device=device, dtype=dtype, base=base))

    @property
    def default_size(self) -> tuple[int, int]:
        return self.parts.image_side, self.parts.image_side

    @property
    def max_prompt_tokens(self) -> int:
        """Room for the prompt text after the template: within the context with t_emb and the image, and within
        the prefix the KV plan counts (`T2I_PREFIX_TOKENS`)."""
        template = len(self.parts.processor.t2i_prefix(""))
        return min(self.parts.context_length - 1 - self.parts.num_gen_tokens - template - 4,
                   T2I_PREFIX_TOKENS - template)

    def reserve_memory(self, max_batch: int) -> None:
        """The KV pool of `max_batch` images (2 rows each, CFG) at the longest prefix, padded as `sample` pads it."""
        longest = len(self.parts.processor.t2i_prefix("")) + self.max_prompt_tokens
        P = -(-longest // PREFIX_BUCKET) * PREFIX_BUCKET
        self.kv_pool.reserve(2 * max_batch, P + 1 + self.parts.num_gen_tokens)

    def prefixes(self, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each prompt's prefix; over-long prompts are cut to `max_prompt_tokens`."""
        proc, limit = self.parts.processor, self.max_prompt_tokens
        out, truncated = [], []
        for prompt in prompts:
            cut = len(proc.text_tokens(prompt)) > limit
            out.append(proc.t2i_prefix(self.kept_prompt(prompt) if cut else prompt))
            truncated.append(cut)
        return out, truncated

    def kept_prompt(self, prompt: str) -> str:
        """The first `max_prompt_tokens` tokens of the prompt, as text."""
        proc = self.parts.processor
        return proc.tokenizer.decode(proc.text_tokens(prompt)[:self.max_prompt_tokens])

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's prefix, template included, as the LLM reads it."""
        return len(self.prefixes([prompt])[0][0])

    def fast_path(self) -> CompiledCalls:
        """The per-step forward (`velocity`) compiled per (rows, padded prefix) bucket."""
        return CompiledCalls([(self, "flow_step")])

    def velocity(self, z2: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 kv: KVBuffers, write: int) -> torch.Tensor:
        """One ODE step's velocity for rows [cond; uncond] (`z2`: (R, 4, h, w)) at times `t` (R,), over the
        prompt KV already in `kv`; the step's 1 + G tokens are written at columns [write, write + 1 + G)."""
        model = self.parts.model
        tokens, t_emb, skips = model.encode_latents(z2, t)                         # (R, G, D), (R, D)
        x = torch.cat([t_emb[:, None], tokens], dim=1)                           # (R, 1+G, D)
        h = run_layers(model.language_model, x, positions, kv, write=write, mask=mask)
        return model.decode_velocity(h[:, 1:], skips, t_emb)                     # (R, 4, h, w)

    @torch.inference_mode()
    def sample(self, prefixes: list[list[int]], z: torch.Tensor, steps: int,
               guidance: torch.Tensor | float) -> torch.Tensor:
        """prefixes: B token-id lists; z (B, 4, h, w) noise → latents (B, 4, h, w)."""
        p = self.parts
        lm, dev = p.model.language_model, z.device
        B, G = len(prefixes), p.num_gen_tokens
        P = -(-max(len(ids) for ids in prefixes) // PREFIX_BUCKET) * PREFIX_BUCKET          # padded prefix
        R = 2 * B                                                     # [cond B; uncond B]
        lengths = torch.tensor([len(ids) for ids in prefixes] * 2, device=dev)            # (R,)
        ids = torch.full((R, P), p.processor.pad_id, dtype=torch.long, device=dev)
        for i, row in enumerate(prefixes):
            ids[i, :len(row)] = torch.tensor(row, device=dev)
            ids[B + i, 0] = row[0]                                    # uncond keeps only BOS
        col = torch.arange(P, device=dev)
        visible = col[None, :] < lengths[:, None]                     # (R, P) prompt keys
        visible[B:] = col[None, :] == 0

        kv = self.kv_pool.batch(R, P + 1 + G)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        run_layers(lm, lm.get_input_embeddings()(ids), col.expand(R, P), kv, write=0,
                   mask=causal[None, None] & visible[:, None, None, :])              # (R, 1, P, P)

        gen_pos = lengths[:, None] + torch.arange(1 + G, device=dev)                 # (R, 1+G)
        gen_causal = torch.ones(1 + G, 1 + G, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([visible[:, None, None, :].expand(R, 1, 1 + G, P),
                          gen_causal.expand(R, 1, 1 + G, 1 + G)], dim=-1)            # (R, 1, 1+G, P+1+G)
        dt = float(torch.tensor(1.0 / steps, dtype=z.dtype))
        for step in range(steps):
            t = torch.full((R,), step / steps * 1000.0, device=dev).to(z.dtype)
            v = self.flow_step(torch.cat([z, z]), t, gen_pos, mask, kv, P)          # (R, 4, h, w)
            z_prev, z = z, kernels.janus_cfg_euler_step(z, v, dt, guidance)
            keep = between_steps(lambda rows: self.decode(straight_ahead(z_prev, z, rows, 1.0 - (step + 1) / steps,
                                                                         dt)), steps)
            if keep is not None:
                R = 2 * len(keep)
                rows = keep + [len(z) + k for k in keep]                            # [cond; uncond] rows kept
                z, guidance, gen_pos, mask = keep_rows(keep, z), keep_rows(keep, guidance), gen_pos[rows], mask[rows]
                kv = self.kv_pool.keep(kv, rows)
        return z

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        vae = self.parts.vae
        image = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = image.float().clip(-1.0, 1.0).permute(0, 2, 3, 1)                    # (B, H, W, 3)
        return ((image + 1) / 2 * 255).cpu().numpy().astype(np.uint8)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        z = initial_noise(seeds, self.parts.latent_shape, dtype=NOISE_DTYPE, device="cpu")
        return z.to(device=self.parts.device, dtype=self.parts.dtype)

    def run(self, specs: list[ImageSpec]) -> BatchOutput:
        timer = StageTimer(sync=self.parts.synchronize)
        with timer.stage("encode"):
            prefixes, truncated = self.prefixes([s.prompt for s in specs])
            guidance = guidance_tensor([s.guidance for s in specs], self.parts.device)
        with timer.stage("sample"):
            z = self.sample(prefixes, self.noise([s.seed for s in specs]), specs[0].steps, guidance)
        with timer.stage("decode"):
            images = self.decode(z)
        return BatchOutput(images, truncated, timer.timings)
