"""Model-level latency: our pipeline next to a plain diffusers loop over the same weights,
per stage (text encode, sample, decode) and end to end, for each batch and size.

The baseline is what a hand-written diffusers script does with the same components:
eager modules with their default attention, the same Euler/PeRFlow loop, no caching.
Ours is the serving pipeline as the engine runs it (fast path on CUDA: every bucket captured before any is
timed, each row carrying what the capture cost).
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from rfserve.benchmarks.capture import capture
from rfserve.benchmarks.timing import call_ms
from rfserve.model_zoo.base import ImageSpec, parse_size
from rfserve.model_zoo.loading import resolve_source
from rfserve.model_zoo.registry import load_model, parse_spec
from rfserve.model_zoo.sd_components import SDComponents
from rfserve.model_zoo.sd_config import save_random_sd


class PlainLoop:
    """The baseline: the same components, called as a plain diffusers script would."""

    def __init__(self, root: Path, device, dtype, family: str, perflow_scheduler=None):
        self.parts = SDComponents.load(root, device=device, dtype=dtype)
        self.family, self.scheduler = family, perflow_scheduler

    @torch.inference_mode()
    def stages(self, specs: list[ImageSpec], timer) -> dict[str, float]:
        p, first = self.parts, specs[0]
        cfg = first.uses_cfg
        out: dict[str, float] = {}
        state: dict = {}

        def encode():
            tok = p.tokenizer([s.prompt for s in specs] + ([s.negative_prompt for s in specs] if cfg else []),
                              padding="max_length", max_length=p.max_tokens, truncation=True, return_tensors="pt")
            emb = p.text_encoder(tok.input_ids.to(p.device))[0]
            state["emb"] = torch.cat([emb[len(specs):], emb[:len(specs)]]) if cfg else emb

        def sample():
            x = torch.randn((len(specs), *p.latent_shape(first.width, first.height)), device=p.device, dtype=p.dtype)
            if self.family == "perflow":
                self.scheduler.set_timesteps(first.steps)
                for t in self.scheduler.timesteps:
                    eps = p.unet(torch.cat([x, x]) if cfg else x, t, encoder_hidden_states=state["emb"]).sample
                    if cfg:
                        u, c = eps.chunk(2)
                        eps = u + first.guidance * (c - u)
                    x = self.scheduler.step(eps, t, x).prev_sample
            else:
                for i in range(first.steps):
                    t = torch.full((x.shape[0] * (2 if cfg else 1),), (1 - i / first.steps) * 1000.0, device=p.device)
                    v = p.unet(torch.cat([x, x]) if cfg else x, t, encoder_hidden_states=state["emb"]).sample
                    if cfg:
                        u, c = v.chunk(2)
                        v = u + first.guidance * (c - u)
                    x = x + v / first.steps
            state["x"] = x

        def decode():
            image = p.vae.decode(state["x"] / p.vae.config.scaling_factor).sample
            (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()

        for name, fn in (("encode", encode), ("sample", sample), ("decode", decode)):
            out[name] = timer(fn)
        out["e2e"] = sum(out.values())
        return out


_CALLS = itertools.count()


def _ours_stages(pipe, specs: list[ImageSpec], timer) -> dict[str, float]:
    """Distinct prompts every call, so the text cache does not hide the encoder."""
    call = next(_CALLS)
    specs = [ImageSpec(f"{s.prompt} #{call}.{i}", s.negative_prompt, s.seed, s.width, s.height, s.steps, s.guidance)
             for i, s in enumerate(specs)]
    last: dict[str, float] = {}
    ms = timer(lambda: last.update(pipe.run(specs).timings))
    return {**{k: v * 1000 for k, v in last.items()}, "e2e": ms}


def bench(spec_text: str | None, *, arch: str, batches: list[int], sizes: list[str] | None, steps: int | None,
          device: str, dtype: torch.dtype, repeats: int, compile_mode: str | None) -> list[dict]:
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as scratch:
        if spec_text is None:
            spec_text = f"instaflow-0.9b={save_random_sd(Path(scratch) / 'random', arch)}"
        spec = parse_spec(spec_text)
        model = load_model(spec, dev, dtype)
        pipe, card = model.pipeline, model.card
        base = PlainLoop(resolve_source(spec.source), dev, dtype, card.family,
                         getattr(pipe, "scheduler", None))
        timer, rows = (lambda fn: call_ms(fn, dev)), []
        d = card.defaults
        cases = [(size, [ImageSpec("two red circles on a blue background", d.negative_prompt, i, *parse_size(size),
                                   steps or d.steps, d.guidance) for i in range(b)])
                 for size in sizes or [d.size] for b in batches]
        fast = pipe.fast_path() if dev.type == "cuda" else None
        captured = None if fast is None else \
            capture(fast, lambda: [_ours_stages(pipe, specs, timer) for _, specs in cases], compile_mode)
        for size, specs in cases:
            for _ in range(2):                                # warm-up
                _ours_stages(pipe, specs, timer)
                base.stages(specs, timer)
            ours = [_ours_stages(pipe, specs, timer) for _ in range(repeats)]
            plain = [base.stages(specs, timer) for _ in range(repeats)]
            b = len(specs)
            row: dict = {"model": card.name, "size": size, "batch": b, "steps": specs[0].steps, "capture": captured}
            for stage in ("encode", "sample", "decode", "e2e"):
                o = statistics.median(r[stage] for r in ours)
                p = statistics.median(r[stage] for r in plain)
                row[stage] = {"ours_ms": o, "baseline_ms": p, "speedup": p / o if o else float("nan")}
            row["ours_img_s"] = b / (row["e2e"]["ours_ms"] / 1000)
            row["baseline_img_s"] = b / (row["e2e"]["baseline_ms"] / 1000)
            rows.append(row)
    return rows
