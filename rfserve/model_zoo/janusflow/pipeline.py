"""JanusFlow text-to-image: rectified flow *inside* the LLM, with the prompt KV computed once.

Semantics are the official demo's `generate()` (demo/app_janusflow.py, README):
- each image has a conditional and an unconditional row; an unconditional row keeps only BOS
  visible, and both rows of a prompt put t_emb at that prompt's last-token position, followed by
  the G image tokens (576 for 384² images);
- N Euler steps (30 by default) from noise at t = 0 to t = 1000·(N−1)/N, with t and dt cast to
  the latent dtype as the reference does; CFG v = w·v_c − (w−1)·v_u (w = 2 by default);
- the SDXL VAE decodes z / scaling_factor; pixels are clip(−1, 1) → (x+1)/2·255, truncated.

Where we differ, exactly: the reference runs the whole [prompt | t_emb | image] sequence through
the LLM at every step. Attention is causal, so the prompt's keys and values do not depend on
z or t; we compute them once, when a row begins or joins, and run only the 1 + G new tokens per
step, writing their KV over the same buffer columns each step. Prompts of different lengths share
a batch by right-padding the prefix (to a multiple of PREFIX_BUCKET tokens, so that the per-step
graph has one shape per bucket of prompt lengths), masking the padding and giving every row its
own RoPE positions. A row whose w is exactly 1 has no unconditional row: w·v_c − (w−1)·v_u is then
v_c, whatever v_u is; every other w (below 1 too) needs both branches, so those rows keep both.

Rows are stepped one step at a time (model_zoo.base.Pipeline): each image row has its own step
count, its own place in it (t = done/steps·1000, dt = 1/steps) and its own w; t, the positions
and the mask are tensors of the one forward, so rows at any points of any schedules share it and
a join changes nothing the compiled step is keyed on but its rows and its width bucket.

Noise: image i of a request with seed s draws `torch.randn((1, 4, h, w), dtype=torch.bfloat16,
generator=torch.Generator("cpu").manual_seed(s + i))`, the reference's bf16 CPU draw made
per image, then moves to the device and the pipeline dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rfserve import kernels
from rfserve.model_zoo.base import BatchOutput, ImageSpec, StageTimer
from rfserve.model_zoo.fast_path import CompiledCalls
from rfserve.model_zoo.janusflow.llm import T2I_PREFIX_TOKENS, KVBuffers, KVPool, run_layers
from rfserve.model_zoo.janusflow.loading import JanusFlowParts, load_parts
from rfserve.model_zoo.running import Running, Stepped
from rfserve.model_zoo.samplers import grouped_update, straight_ahead
from rfserve.model_zoo.seeding import initial_noise

NOISE_DTYPE = torch.bfloat16
# Prefixes are padded to a multiple of this: the step's shapes (and so its compiled graph) depend on the
# padded length only; masked columns add exact zeros to attention.
PREFIX_BUCKET = 64


@dataclass(frozen=True)
class Prompts:
    """Image rows' prompt prefixes (token ids), and which of them have an unconditional branch (w ≠ 1)."""
    prefixes: list[list[int]]
    uncond: list[bool]

    def kv_rows(self, rows: list[int]) -> list[int]:
        """The KV rows of image `rows`: each one's conditional row, then its unconditional one if it has one."""
        start = np.cumsum([0] + [1 + u for u in self.uncond])
        return [r for i in rows for r in range(start[i], start[i + 1])]


@dataclass(eq=False)
class PromptKV:
    """A running batch's prompt KV, in the pipeline's pool, and the flow step's per-row inputs over it: a
    `RowState` (model_zoo.running) that the pipeline lays out anew when rows leave (`take`) or join (`join`,
    with the joiners' `Prompts`, which it prefills then).

    KV rows follow `Prompts.kv_rows`, so joiners' rows come after the running ones and are prefilled where they
    stay. Every row is padded to one width P, the bucket of the longest prefix among the rows: a longer joiner
    widens the running rows (their prefix columns copied, the new columns masked), and rows leaving may narrow
    them. The step's 1 + G tokens go at columns [P, P + 1 + G) of every row."""
    prompts: Prompts
    kv: KVBuffers | None                    # None: no rows
    width: int                              # P
    owner: torch.Tensor                     # (R,) each KV row's image row
    cond_rows: torch.Tensor                 # (B,) each image row's conditional KV row
    uncond_rows: torch.Tensor               # (n,) the unconditional KV rows, in image-row order
    positions: torch.Tensor                 # (R, 1+G) RoPE positions of the step's tokens
    mask: torch.Tensor                      # (R, 1, 1+G, P+1+G) the key columns each step token sees
    pipe: JanusFlowPipeline

    def take(self, rows: list[int]) -> PromptKV:
        if rows == list(range(len(self.prompts.uncond))):
            return self
        return self.pipe.lay_out(self, rows)

    def join(self, other: Prompts) -> PromptKV:
        return self.pipe.lay_out(self, list(range(len(self.prompts.uncond))), other)


class JanusFlowPipeline(Stepped):
    """`model_zoo.base.Pipeline` for JanusFlow. A running batch's rows: "z" (B, 4, h, w) latents, "z_prev" those
    before the last step (for previews), "kv" their `PromptKV`. One running batch at a time holds the KV pool
    (JanusFlow has one join key: one size, no edits); stepping or laying out any other is refused."""
    family = "janusflow"

    def __init__(self, parts: JanusFlowParts):
        self.parts = parts
        self.kv_pool = KVPool(parts.model.language_model, parts.device, parts.dtype)
        self.flow_step = self.velocity          # the hot call, which the fast path swaps for a compiled one
        self._holder: PromptKV | None = None    # the rows whose KV the pool holds now

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
        """The KV pool of `max_batch` images (2 rows each, CFG) at the longest prefix, padded as `lay_out` pads it:
        no running batch of at most `max_batch` images needs more, whatever joins it."""
        longest = len(self.parts.processor.t2i_prefix("")) + self.max_prompt_tokens
        self.kv_pool.reserve(2 * max_batch, _padded(longest) + 1 + self.parts.num_gen_tokens)

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
        """The per-step forward (`velocity`) compiled per (KV rows, padded prefix) bucket."""
        return CompiledCalls([(self, "flow_step")])

    def velocity(self, z2: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 kv: KVBuffers, write: int) -> torch.Tensor:
        """One ODE step's velocity for the KV rows (`z2`: (R, 4, h, w), each row its image's latents) at times `t`
        (R,), over the prompt KV already in `kv`; the step's 1 + G tokens are written at columns
        [write, write + 1 + G). `write` is the mask's width less 1 + G, so the call's shapes fix it."""
        model = self.parts.model
        tokens, t_emb, skips = model.encode_latents(z2, t)                         # (R, G, D), (R, D)
        x = torch.cat([t_emb[:, None], tokens], dim=1)                           # (R, 1+G, D)
        h = run_layers(model.language_model, x, positions, kv, write=write, mask=mask)
        return model.decode_velocity(h[:, 1:], skips, t_emb)                     # (R, 4, h, w)

    # -- the step-level interface ---------------------------------------------------
    def begin(self, specs: list[ImageSpec]) -> Running:
        """The specs admitted into a batch of no rows, so that a batch's first rows and its joiners are laid out
        and prefilled alike."""
        z = torch.empty(0, *self.parts.latent_shape, device=self.parts.device, dtype=self.parts.dtype)
        running = Running([], [], [], {"z": z, "z_prev": z, "kv": self._no_rows()}, sync=self.parts.synchronize)
        self.admit(running, specs)
        return running

    @torch.inference_mode()
    def admit(self, running: Running, specs: list[ImageSpec]) -> None:
        """The joiners' prefixes are prefilled into the pool behind the running rows (`PromptKV.join`), not begun
        apart: the pool holds one batch's KV."""
        with running.stage("encode"):
            prefixes, truncated = self.prefixes([s.prompt for s in specs])
            z = self.noise([s.seed for s in specs])
            prompts = Prompts(prefixes, [s.guidance != 1.0 for s in specs])
            running.extend(Running(specs, truncated, [s.steps for s in specs], {"z": z, "z_prev": z, "kv": prompts}))

    @torch.inference_mode()
    def step(self, running: Running) -> None:
        """Every row's Euler step at its own t and dt, in one forward over the KV rows; then each group of rows
        sharing a dt and having (or not) an unconditional row takes its update."""
        kv, z = running.rows["kv"], running.rows["z"]
        self._check_holds(kv)
        t = torch.tensor([done / steps * 1000.0 for done, steps in zip(running.done, running.steps)],
                         device=z.device).to(z.dtype)                                         # (B,)
        v = self.flow_step(z[kv.owner], t[kv.owner], kv.positions, kv.mask, kv.kv, kv.width)      # (R, 4, h, w)
        out = torch.cat([v[kv.uncond_rows], v[kv.cond_rows]])        # (n + B, ...) as samplers.with_uncond lays it
        dt = {s: float(torch.tensor(1.0 / s, dtype=z.dtype)) for s in set(running.steps)}
        cfg = [i for i, u in enumerate(kv.prompts.uncond) if u]
        running.rows["z_prev"] = z
        running.rows["z"] = grouped_update(z, out, cfg, [dt[s] for s in running.steps],
                                           [s.guidance for s in running.specs], _janus_update)
        running.advance()

    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        """Each row's last step continued straight to t = 1: (steps − done) times its length."""
        ahead = [float(running.steps[i] - running.done[i]) for i in rows]
        return self.decode(straight_ahead(running.rows["z_prev"], running.rows["z"], rows, ahead))

    def finish(self, running: Running, rows: list[int]) -> BatchOutput:
        timer = StageTimer(self.parts.synchronize)
        with timer.stage("decode"):
            images = self.decode(running.rows["z"][rows])
        out = BatchOutput(images, [running.truncated[i] for i in rows], timer.timings)
        running.leave(rows)
        return out

    # -- the prompt KV -----------------------------------------------------------------
    @torch.inference_mode()
    def lay_out(self, state: PromptKV, keep: list[int], joining: Prompts | None = None) -> PromptKV:
        """`state`'s image rows `keep`, then `joining`'s (prefilled now), in the pool at the width of the longest
        prefix among them. The kept rows' prefix columns are copied out first, since the new layout overlaps the
        old one; the pool, reserved at load for `--max-batch` images at the longest prefix, never grows."""
        self._check_holds(state)
        joining = joining or Prompts([], [])
        prompts = Prompts([state.prompts.prefixes[i] for i in keep] + joining.prefixes,
                          [state.prompts.uncond[i] for i in keep] + joining.uncond)
        if not prompts.uncond:
            self._holder = self._no_rows()
            return self._holder
        P, G, dev = _padded(max(map(len, prompts.prefixes))), self.parts.num_gen_tokens, self.parts.device
        old = state.prompts.kv_rows(keep)
        owner, uncond, lengths, visible = _rows(prompts, P, dev)
        R = len(owner)
        kv = self.kv_pool.lay_out(state.kv, old, R, P + 1 + G, columns=min(P, state.width))   # prefixes only
        if joining.prefixes:
            self._prefill(joining, kv.rows(R, len(old)), P)
        gen_causal = torch.ones(1 + G, 1 + G, dtype=torch.bool, device=dev).tril()
        self._holder = PromptKV(
            prompts, kv, P, owner, cond_rows=(~uncond).nonzero()[:, 0], uncond_rows=uncond.nonzero()[:, 0],
            positions=lengths[:, None] + torch.arange(1 + G, device=dev),
            mask=torch.cat([visible[:, None, None, :].expand(R, 1, 1 + G, P),
                            gen_causal.expand(R, 1, 1 + G, 1 + G)], dim=-1), pipe=self)
        return self._holder

    def _prefill(self, prompts: Prompts, kv: KVBuffers, P: int) -> None:
        """The prompts' KV rows (an unconditional one reads only BOS), padded to P, written at columns [0, P)."""
        lm, dev = self.parts.model.language_model, self.parts.device
        owner, uncond, _, visible = _rows(prompts, P, dev)
        ids = torch.full((len(owner), P), self.parts.processor.pad_id, dtype=torch.long, device=dev)
        for r, (i, u) in enumerate(zip(owner.tolist(), uncond.tolist())):
            row = prompts.prefixes[i][:1] if u else prompts.prefixes[i]
            ids[r, :len(row)] = torch.tensor(row, device=dev)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        col = torch.arange(P, device=dev)
        run_layers(lm, lm.get_input_embeddings()(ids), col.expand(len(owner), P), kv, write=0,
                   mask=causal[None, None] & visible[:, None, None, :])                     # (R, 1, P, P)

    def _no_rows(self) -> PromptKV:
        dev, none = self.parts.device, torch.zeros(0, dtype=torch.long, device=self.parts.device)
        return PromptKV(Prompts([], []), None, 0, none, none, none, none.view(0, 1),
                        torch.zeros(0, 1, 1, 1, dtype=torch.bool, device=dev), self)

    def _check_holds(self, state: PromptKV) -> None:
        if state.kv is not None and state is not self._holder:
            raise RuntimeError("another running batch of this pipeline holds its KV pool: they cannot interleave")

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        vae = self.parts.vae
        image = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = image.float().clip(-1.0, 1.0).permute(0, 2, 3, 1)                    # (B, H, W, 3)
        return ((image + 1) / 2 * 255).cpu().numpy().astype(np.uint8)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        z = initial_noise(seeds, self.parts.latent_shape, dtype=NOISE_DTYPE, device="cpu")
        return z.to(device=self.parts.device, dtype=self.parts.dtype)


def _padded(length: int) -> int:
    return -(-length // PREFIX_BUCKET) * PREFIX_BUCKET


def _rows(prompts: Prompts, P: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV row (`Prompts.kv_rows` order): its image row (R,), whether it is unconditional (R,), its prompt's
    length (R,), after which both branches put the step's tokens, and the prefix columns it sees (R, P)."""
    owner = torch.tensor([i for i, u in enumerate(prompts.uncond) for _ in range(1 + u)], device=device)
    uncond = torch.tensor([k == 1 for u in prompts.uncond for k in range(1 + u)], device=device)
    lengths = torch.tensor([len(prompts.prefixes[i]) for i in owner.tolist()], device=device)
    col = torch.arange(P, device=device)
    visible = torch.where(uncond[:, None], col[None] == 0, col[None] < lengths[:, None])    # (R, P)
    return owner, uncond, lengths, visible


def _janus_update(z: torch.Tensor, out: torch.Tensor, dt: float, w: torch.Tensor | float | None) -> torch.Tensor:
    """A group's Euler step: with an unconditional branch (out [v_u; v_c], as `grouped_update` hands it), the
    reference's z + dt·(w·v_c − (w−1)·v_u) through the fused kernel, which reads [v_c; v_u]; without (w = 1),
    z + dt·v_c, which is what that formula gives at w = 1."""
    if w is None:
        return (z.float() + dt * out.float()).to(z.dtype)
    b = z.shape[0]
    return kernels.janus_cfg_euler_step(z, torch.cat([out[b:], out[:b]]), dt, w)
