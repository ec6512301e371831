"""Hunyuan-DiT, ours against plain diffusers `HunyuanDiTPipeline` in the same run and on the same modules.

Random weights in the published v1.2 architecture (model_zoo.hunyuan_dit.arch "v1.2": DiT-g/2 1.5B,
BERT-large-sized and mT5-xl-encoder-sized text encoders, also random and real-sized, SDXL VAE) at 1024²,
batch 1 with CFG (one transformer forward at batch 2 per step). Reported per side: text encode (a new
prompt; diffusers also re-encodes the empty negative, which ours caches), one CFG step (sampling loop /
steps), VAE decode, and end to end. Ours runs twice: eagerly, then with the transformer compiled and captured
as the server serves it (`--compile-mode`; benchmarks.capture). CUDA events and the median after warm-up on
GPU, bf16; `--tiny` runs the tiny preset on CPU in fp32 so the script is exercised end to end (not a
performance figure).

    python -m rfserve.benchmarks.bench_hunyuan [--tiny] [--steps 50] [--repeat 3] [--compile-mode MODE|off] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import HunyuanDiTPipeline

from rfserve.benchmarks.capture import add_mode_flag, capture, resolve_mode, summary
from rfserve.benchmarks.timing import median_ms
from rfserve.model_zoo.base import ImageSpec, parse_size
from rfserve.model_zoo.hunyuan_dit import HunyuanPipeline
from rfserve.model_zoo.hunyuan_dit.arch import HunyuanArchConfig, build_random_hunyuan
from rfserve.model_zoo.hunyuan_dit.components import HunyuanComponents
from rfserve.model_zoo.hunyuan_dit.geometry import scaled_size

PROMPT = "a photo of a cat on a red square, high quality"
TARGETS = "H100 targets: ≤ 60 ms per CFG step at 1024², ≤ 3.0 s end to end for 50 steps"


def bench_diffusers(parts: dict, width: int, height: int, steps: int, ms) -> dict:
    """The baseline as a user runs it: default attention processors, fresh encodes every call."""
    pipe = HunyuanDiTPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype

    def call(output_type="np", **embeds):
        return pipe(None if embeds else PROMPT, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=5.0, generator=[torch.Generator().manual_seed(0)], output_type=output_type,
                    use_resolution_binning=False, **embeds)

    def encode() -> dict:
        """Both encoders, prompt and empty negative, in the keyword names __call__ takes."""
        embeds = {}
        for index, length, suffix in ((0, 77, ""), (1, 256, "_2")):
            e, neg, mask, neg_mask = pipe.encode_prompt(PROMPT, device=device, dtype=dtype,
                                                        max_sequence_length=length, text_encoder_index=index)
            embeds.update({f"prompt_embeds{suffix}": e, f"negative_prompt_embeds{suffix}": neg,
                           f"prompt_attention_mask{suffix}": mask, f"negative_prompt_attention_mask{suffix}": neg_mask})
        return embeds

    latents = torch.randn(1, 4, height // 8, width // 8, device=device, dtype=dtype)
    with torch.inference_mode():
        embeds = encode()
        return dict(encode_ms=ms(encode), sample_ms=ms(lambda: call(output_type="latent", **embeds)),
                    decode_ms=ms(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor)),
                    end_to_end_ms=ms(call))


@torch.inference_mode()
def bench_ours(parts: dict, width: int, height: int, steps: int, ms, mode: str | None) -> dict:
    """Our pipeline over the same modules (installs our attention processor on the shared transformer): the
    stages eagerly, then, with a compile `mode`, again after capturing its fast path at this bucket. All under
    inference mode, as the server runs: a graph compiled for tensors made outside it compiles again for
    `pipe.run`'s, whose dispatch keys differ."""
    comps = HunyuanComponents(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                              parts["text_encoder_2"], parts["tokenizer_2"], dict(parts["scheduler"].config),
                              parts["transformer"].device, parts["transformer"].dtype)
    pipe = HunyuanPipeline(comps, scheduler="ddpm")
    spec = ImageSpec(PROMPT, "", 0, width, height, steps, 5.0)

    def sample():
        """The steps as the engine takes them; `begin` adds a cached text lookup and the noise's draw."""
        running = pipe.begin([spec])
        while running.stepping():
            pipe.step(running)
        return running.rows["x"]

    latents = torch.randn(1, *comps.latent_shape(width, height), device=comps.device, dtype=comps.dtype)

    def stages() -> dict:
        return dict(encode_ms=ms(lambda: comps.encode_text([PROMPT])), sample_ms=ms(sample),
                    decode_ms=ms(lambda: comps.decode(latents)), end_to_end_ms=ms(lambda: pipe.run([spec])))

    out = {"ours": stages(), "ours_compiled": None, "capture": None}
    if mode:
        out["capture"] = capture(pipe.fast_path(), sample, mode)
        out["ours_compiled"] = stages()
    return out


def environment(device: torch.device, threads: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or 'cpu'}, torch threads {threads})"
    return dict(device=name, torch=torch.__version__, triton=triton_version, diffusers=diffusers.__version__,
                transformers=transformers.__version__, date=datetime.date.today().isoformat())


def markdown(report: dict) -> str:
    env, steps = report["environment"], report["steps"]
    compiled, info = report["ours_compiled"], report["capture"]
    lines = [f"Device: {env['device']}; torch {env['torch']}, Triton {env['triton']}, diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}; {env['date']}; {report['arch']} arch, {report['size']}, "
             f"{report['dtype']}, batch 1, CFG, {steps} DDPM steps; median of {report['repeat']}.",
             "", f"| stage | ours eager ms | ours compiled ms | diffusers ms | diffusers / ours "
             f"{'compiled' if compiled else 'eager'} | eager / compiled |", "|---|---|---|---|---|---|"]
    rows = [("text encode", "encode_ms", 1), ("one CFG step", "sample_ms", steps), ("VAE decode", "decode_ms", 1),
            (f"end to end ({steps} steps)", "end_to_end_ms", 1)]
    for label, key, div in rows:
        eager, ref = report["ours"][key] / div, report["diffusers"][key] / div
        fast = compiled[key] / div if compiled else None
        cells = (f"{fast:.2f}", f"{ref / fast:.2f}×", f"{eager / fast:.2f}×") if fast else \
            ("—", f"{ref / eager:.2f}×", "—")
        lines.append(f"| {label} | {eager:.2f} | {cells[0]} | {ref:.2f} | {cells[1]} | {cells[2]} |")
    lines.append("\nCompiled: " + (f"mode {info['mode']}, the transformer; {summary(info)}." if info else "off."))
    if report["arch"] == "tiny":
        lines.append("\nTiny CPU run: exercises the script; not a performance figure.")
    return "\n".join(lines + ["", TARGETS]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random preset on CPU, fp32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    add_mode_flag(parser)
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.tiny
    if not use_cuda and not args.tiny:
        parser.error("no CUDA device: the 1.5B model at 1024² is a GPU benchmark; use --tiny on CPU")
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    if args.tiny:
        torch.set_num_threads(1)   # tiny ops are overhead-bound; extra threads only contend on a shared CPU
    arch = "tiny" if args.tiny else "v1.2"
    cfg = HunyuanArchConfig.preset(arch)
    width, height = parse_size(scaled_size("1024x1024", cfg.transformer["sample_size"]))

    def ms(fn):
        return median_ms(fn, device, warmup=1, repeat=args.repeat)

    with tempfile.TemporaryDirectory() as scratch:
        parts = build_random_hunyuan(cfg, seed=0, scratch=Path(scratch), device=device, dtype=dtype)
    report = dict(environment=environment(device, torch.get_num_threads()), arch=arch, size=f"{width}x{height}",
                  dtype=str(dtype).removeprefix("torch."), steps=args.steps, repeat=args.repeat,
                  diffusers=bench_diffusers(parts, width, height, args.steps, ms),
                  **bench_ours(parts, width, height, args.steps, ms, resolve_mode(args.compile_mode, device)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_hunyuan.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "bench_hunyuan.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
