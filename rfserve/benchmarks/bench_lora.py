"""Mixed-adapter LoRA batches (issue #34): rows with different adapters in one batch, against one batch per adapter
and against fused weights, each as a ratio against the batch without LoRA timed in the same run.

Contenders, on one random-weight InstaFlow build (the same weights, specs, seeds and prompts for all):
- `none`: our pipeline with no LoRA enabled, one batch of every row: the baseline of every ratio;
- `mixed`: our pipeline with a pool (`enable_lora`), every row its own adapter, one batch;
- `per_adapter_ours`: the same pipeline and pool, the rows grouped by adapter, one batch per adapter (what a
  server that cannot mix adapters, vLLM-Omni's, does);
- `per_adapter_diffusers`: our sampling loop over a UNet into which diffusers loaded every adapter
  (`load_lora_weights`, untimed), `set_adapters` to the batch's adapter before each batch (timed): the hand-rolled
  way, through peft's layers;
- `fused`: diffusers' `fuse_lora` of one adapter into a UNet copy, then `unload_lora_weights`, one batch: what a
  single adapter costs at best.
The same loop runs every contender, so the ratios are the LoRA mechanisms' alone. Contenders are timed in turn
within each repeat (after `--warmup` untimed rounds), so drift on a shared machine touches all alike; the figure is
the median. Each call is the whole `run` (text from the warm cache, the steps, the VAE decode); `sample_ms` is its
steps alone (the stage timings). Before timing, float images check that the contenders compare like with like: a
mixed batch's rows equal each adapter's own batch, ours and diffusers', and the fused weights equal diffusers'
adapter (the `parity` entry, max |Δ| on [0, 1] images).

Adapters are UNet-only (as diffusers' `train_text_to_image_lora.py` trains them), rank `--ranks`, on every layer
the pool serves (`pool.UNET_TARGETS`), random, saved with diffusers' `save_lora_weights` and read back by both
sides from that file. Row i takes adapter i mod `--adapters`. Sizes: `tiny` (the tests' config, where fixed
overheads dominate), `small` (SD1.5's first two UNet levels at their widths, 320 and 640, cross-attention 768: the
ratio of LoRA to base work is SD1.5's there), `sd15` (the real architecture; fp16, for `--device cuda`).

`--compiled` adds no LoRA against mixed on the compiled fast path, the server's once it has captured its graphs.

    python -m rfserve.benchmarks.bench_lora [--device cuda] [--sizes tiny,small] [--compiled] [--dry] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict

from rfserve.benchmarks.bench_joining import default_out
from rfserve.benchmarks.loadgen import environment
from rfserve.benchmarks.timing import call_ms, device_label, save_report
from rfserve.model_zoo.base import BatchOutput, ImageSpec
from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import UNET_TARGETS, PoolConfig
from rfserve.model_zoo.sd_components import SDComponents
from rfserve.model_zoo.sd_config import SDArchConfig, build_random_sd

CONTENDERS = ("none", "mixed", "per_adapter_ours", "per_adapter_diffusers", "fused")
TARGETS = {"per_adapter_over_mixed": 3.0, "mixed_over_none": 1.3}      # issue #34, on the CPU at 8 rows
SIZES = {
    "tiny": SDArchConfig.preset("tiny"),
    "small": replace(
        SDArchConfig.preset("tiny"),
        unet=dict(sample_size=8, block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768)),
    "sd15": SDArchConfig.preset("sd15"),
}


@dataclass
class Pipes:
    """One build's pipelines, each with its own copy of the base UNet: `base` (no LoRA), `pooled` (our pool, every
    adapter registered), `peft` (diffusers' loader, every adapter loaded; `sd` is the diffusers pipeline around its
    UNet, for `set_adapters`) and `fused` (adapter `names[0]` fused)."""

    base: InstaFlowPipeline
    pooled: InstaFlowPipeline
    peft: InstaFlowPipeline
    sd: StableDiffusionPipeline
    fused: InstaFlowPipeline
    names: list[str]


def build(cfg: SDArchConfig, device: torch.device, dtype: torch.dtype, seed: int, scratch: Path) -> InstaFlowPipeline:
    """A random-weight InstaFlow of `cfg` built in memory (nothing downloaded, nothing written but the tokenizer)."""
    r = build_random_sd(cfg, seed, scratch)
    unet, vae, text = (m.to(device, dtype).eval().requires_grad_(False) for m in (r.unet, r.vae, r.text_encoder))
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return InstaFlowPipeline(SDComponents(unet, vae, text, r.tokenizer, dict(r.scheduler.config), device, dtype,
                                          scale))


def with_unet(pipe: InstaFlowPipeline, unet, **parts) -> InstaFlowPipeline:
    """The same pipeline over another UNet (and any other `parts` given; the rest shared)."""
    return InstaFlowPipeline(replace(pipe.parts, unet=unet, **parts))


def diffusers_around(pipe: InstaFlowPipeline) -> StableDiffusionPipeline:
    """A diffusers pipeline around a copy of `pipe`'s UNet, for diffusers' LoRA loader."""
    p = pipe.parts
    return StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                   unet=copy.deepcopy(p.unet), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_adapters(unet, count: int, rank: int, folder: Path, seed: int) -> list[Path]:
    """`count` random rank-`rank` UNet adapters in diffusers' file format, the layout peft gives on `unet`'s
    targeted layers. A ~ N(0, 1/in) and B ~ N(0, 1/(4r)) at alpha = rank, so an update is a fraction of its
    layer's output, as a trained adapter's is, and each adapter visibly changes the image."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS), init_lora_weights=False)
    probe = copy.deepcopy(unet).to("cpu", torch.float32)
    probe.add_adapter(config, adapter_name="probe")
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(probe, adapter_name="probe").items()}
    del probe
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        std = {k: 1 / math.sqrt(s[1]) if ".lora_A." in k else 0.5 / math.sqrt(s[1]) for k, s in shapes.items()}
        layers = {k: torch.randn(s, generator=g) * std[k] for k, s in shapes.items()}
        path = folder / f"a{i}-r{rank}"
        StableDiffusionLoraLoaderMixin.save_lora_weights(path, unet_lora_layers=layers,
                                                         unet_lora_adapter_metadata=config.to_dict())
        paths.append(path)
    return paths


def prepare(base: InstaFlowPipeline, files: list[Path], pool: PoolConfig) -> Pipes:
    """Every contender's pipeline over its own copy of `base`'s UNet, the adapters loaded each side's own way."""
    names = [f"a{i}" for i in range(len(files))]
    # The pool wraps the text encoder's layers in place too, so the pooled pipeline has its own.
    pooled = with_unet(base, copy.deepcopy(base.parts.unet), text_encoder=copy.deepcopy(base.parts.text_encoder))
    pooled.enable_lora(pool)
    for name, path in zip(names, files):
        pooled.register_lora(name, load_lora(path))
    sd = diffusers_around(base)
    for name, path in zip(names, files):
        sd.load_lora_weights(str(path), adapter_name=name)
    fused_sd = diffusers_around(base)
    fused_sd.load_lora_weights(str(files[0]), adapter_name=names[0])
    fused_sd.fuse_lora(lora_scale=1.0)
    fused_sd.unload_lora_weights()                  # the fused weights stay; peft's layers go
    return Pipes(base, pooled, with_unet(base, sd.unet), sd, with_unet(base, fused_sd.unet), names)


def row_specs(pipe: InstaFlowPipeline, rows: int, names: list[str], steps: int, guidance: float) -> list[ImageSpec]:
    """Row i: its own prompt and seed, adapter i mod len(names) at scale 1."""
    w, h = pipe.default_size
    return [ImageSpec(f"a red square on blue {i}", "blurry", i, w, h, steps, guidance,
                      lora=((names[i % len(names)], 1.0),)) for i in range(rows)]


def by_adapter(specs: list[ImageSpec]) -> dict[str, list[ImageSpec]]:
    """The rows grouped by their adapter, in first-seen order: one batch each for the per-adapter contenders."""
    groups: dict[str, list[ImageSpec]] = {}
    for s in specs:
        groups.setdefault(s.lora[0][0], []).append(s)
    return groups


def plain(specs: list[ImageSpec]) -> list[ImageSpec]:
    return [replace(s, lora=()) for s in specs]


def through_diffusers(p: Pipes, name: str, specs: list[ImageSpec], run: Callable):
    """One batch the hand-rolled way: diffusers' `set_adapters` to `name`, then the batch (no pool)."""
    p.sd.set_adapters([name], [1.0])
    return run(p.peft, plain(specs))


def contenders(p: Pipes, specs: list[ImageSpec]) -> dict[str, Callable[[], list[BatchOutput]]]:
    """Each contender's calls for `specs`, one `BatchOutput` per batch."""
    groups = by_adapter(specs)
    run = lambda pipe, batch: pipe.run(batch)                                      # noqa: E731
    return {"none": lambda: [p.base.run(plain(specs))],
            "mixed": lambda: [p.pooled.run(specs)],
            "per_adapter_ours": lambda: [p.pooled.run(g) for g in groups.values()],
            "per_adapter_diffusers": lambda: [through_diffusers(p, n, g, run) for n, g in groups.items()],
            "fused": lambda: [p.fused.run(plain(specs))]}


def parity(p: Pipes, specs: list[ImageSpec]) -> dict[str, float]:
    """Max |Δ| between float images that must agree: the mixed batch's rows against each adapter's own batch
    (ours, and diffusers' loaded adapter), the fused weights against diffusers' adapter `names[0]`; and
    `adapter_effect`, the least any row's adapter moves its image from no LoRA (so the agreement means something)."""
    images = lambda pipe, batch: pipe.images(batch)[0]                             # noqa: E731
    mixed, none = images(p.pooled, specs), images(p.base, plain(specs))
    groups = by_adapter(specs)
    order = [specs.index(s) for g in groups.values() for s in g]
    ours = torch.cat([images(p.pooled, g) for g in groups.values()])
    theirs = torch.cat([through_diffusers(p, n, g, images) for n, g in groups.items()])
    first = [specs.index(s) for s in groups[p.names[0]]]
    fused = images(p.fused, plain(specs))[first]
    gap = lambda a, b: float((a.float() - b.float()).abs().max())                  # noqa: E731
    return {"mixed_vs_per_adapter_ours": gap(mixed[order], ours),
            "mixed_vs_per_adapter_diffusers": gap(mixed[order], theirs),
            "fused_vs_diffusers": gap(fused, theirs[:len(first)]),
            "adapter_effect": min(gap(mixed[i], none[i]) for i in range(len(specs)))}


def measure(calls: dict[str, Callable[[], list[BatchOutput]]], device: torch.device, warmup: int,
            repeat: int) -> dict[str, dict]:
    """Per contender, the median ms of its whole calls and of their steps alone, and its batches; the contenders
    take turns within each round, the first `warmup` rounds untimed."""
    whole: dict[str, list[float]] = {n: [] for n in calls}
    steps: dict[str, list[float]] = {n: [] for n in calls}
    batches: dict[str, int] = {}
    for i in range(warmup + repeat):
        for name, fn in calls.items():
            outs: list[BatchOutput] = []
            ms = call_ms(lambda: outs.extend(fn()), device)
            batches[name] = len(outs)
            if i >= warmup:
                whole[name].append(ms)
                steps[name].append(1000 * sum(o.timings.get("sample", 0.0) for o in outs))
    base = statistics.median(whole["none"])
    return {n: {"ms": statistics.median(whole[n]), "sample_ms": statistics.median(steps[n]), "batches": batches[n],
                "ratio": statistics.median(whole[n]) / base} for n in calls}


def bench_rank(base: InstaFlowPipeline, rank: int, args: argparse.Namespace, scratch: Path) -> dict:
    """One adapter rank: the contenders' pipelines prepared, the parity check, then every row count timed."""
    files = make_adapters(base.parts.unet, args.adapters, rank, scratch, seed=100 * rank)
    pool = PoolConfig(slots=args.adapters, max_rank=args.max_rank or rank, max_rows=2 * max(args.rows),
                      per_row=args.per_row)
    pipes = prepare(base, files, pool)
    out = {"rank": rank, "max_rank": pool.max_rank, "per_row": pool.per_row,
           "parity": parity(pipes, row_specs(base, args.adapters, pipes.names, args.steps, args.guidance)),
           "points": []}
    for rows in args.rows:
        specs = row_specs(base, rows, pipes.names, args.steps, args.guidance)
        timed = measure(contenders(pipes, specs), base.parts.device, args.warmup, args.repeat)
        out["points"].append({"rows": rows, "adapters": len(by_adapter(specs)), "contenders": timed,
                              "per_adapter_over_mixed": timed["per_adapter_ours"]["ms"] / timed["mixed"]["ms"],
                              "mixed_over_none": timed["mixed"]["ratio"]})
        print(f"rank {rank}, {rows} rows: mixed/none {timed['mixed']['ratio']:.2f}x, per-adapter (ours)/mixed "
              f"{out['points'][-1]['per_adapter_over_mixed']:.2f}x", flush=True)
    if args.compiled:
        out["compiled"] = compiled(pipes, base, args)
    return out


def compiled(p: Pipes, base: InstaFlowPipeline, args: argparse.Namespace) -> list[dict]:
    """No LoRA against the mixed batch on the compiled fast path (`--compile`'s, which the server captures on
    CUDA and, for the SD families, on the CPU after ready), each row count captured first: there every binding
    reads all K adapter columns, as one graph serves them all. After the eager points, which it leaves as they were."""
    batches = {rows: row_specs(base, rows, p.names, args.steps, args.guidance) for rows in args.rows}
    for pipe, lora in ((p.base, False), (p.pooled, True)):
        fast = pipe.fast_path()
        fast.prepare(args.compile_mode)
        for specs in batches.values():
            for _ in range(2):                                  # compile, then (on CUDA) record the graph
                pipe.run(specs if lora else plain(specs))
        fast.finish_capture()
    points = []
    for rows, specs in batches.items():
        timed = measure({"none": lambda: [p.base.run(plain(specs))], "mixed": lambda: [p.pooled.run(specs)]},
                        base.parts.device, args.warmup, args.repeat)
        points.append({"rows": rows, "none_ms": timed["none"]["ms"], "mixed_ms": timed["mixed"]["ms"],
                       "mixed_over_none": timed["mixed"]["ratio"]})
        print(f"compiled, {rows} rows: mixed/none {timed['mixed']['ratio']:.2f}x", flush=True)
    return points


def bench_size(size: str, device: torch.device, args: argparse.Namespace, scratch: Path) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    base = build(SIZES[size], device, dtype, args.seed, scratch / f"{size}-tokenizer")
    w, h = base.default_size
    print(f"== {size}: {w}x{h}", flush=True)
    ranks = [bench_rank(base, rank, args, scratch / f"{size}-r{rank}") for rank in args.ranks]
    params = sum(t.numel() for t in base.parts.unet.parameters()) / 1e6
    return {"size": size, "image": f"{w}x{h}", "dtype": str(dtype).removeprefix("torch."),
            "unet_params_m": round(params, 1), "ranks": ranks}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]                     # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=None,
                    help=f"of {', '.join(SIZES)}; default tiny,small on the CPU, sd15 on CUDA")
    ap.add_argument("--ranks", type=ints, default=[8, 64], help="the adapters' rank")
    ap.add_argument("--max-rank", type=int, default=None, help="the pool's rank (default: the adapters')")
    ap.add_argument("--per-row", type=int, default=2, help="adapters a row may combine (K; the server's default 2)")
    ap.add_argument("--rows", type=ints, default=[1, 8, 32])
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters; row i takes adapter i mod this")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=1.5, help="InstaFlow-2RF's; each row runs an unconditional "
                    "copy with its adapter")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compiled", action="store_true", help="also no LoRA against mixed on the compiled fast path")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode, as the server's")
    ap.add_argument("--dry", action="store_true", help="a check of seconds, not a figure: tiny, 2 adapters of rank 4, "
                    "2 rows, 1 step, one round and no warm-up")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-<date>/lora")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.dry:
        args.sizes, args.ranks, args.adapters, args.rows, args.steps = ["tiny"], [4], 2, [2], 1
        args.warmup, args.repeat = 0, 1
    args.sizes = args.sizes or (["sd15"] if device.type == "cuda" else ["tiny", "small"])
    unknown = set(args.sizes) - set(SIZES)
    if unknown:
        ap.error(f"unknown size {sorted(unknown)[0]!r} (known: {', '.join(SIZES)})")
    args.out = args.out or default_out(device).with_name("lora")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [bench_size(size, device, args, Path(tmp)) for size in args.sizes]
    config = {k: getattr(args, k) for k in ("ranks", "max_rank", "per_row", "rows", "adapters", "steps", "guidance",
                                            "warmup", "repeat", "seed", "dry", "compiled")}
    import diffusers
    import peft

    env = {**environment(), "device": device_label(device), "diffusers": diffusers.__version__,
           "peft": peft.__version__}
    report = {"env": env, "config": config, "targets": TARGETS, "sizes": sizes}
    save_report(args.out, "bench_lora", report, markdown)
    return report


LABELS = {"none": "no LoRA", "mixed": "mixed (ours)", "per_adapter_ours": "per adapter, ours",
          "per_adapter_diffusers": "per adapter, diffusers", "fused": "fused (1 adapter)"}


def markdown(r: dict) -> str:
    env, c = r["env"], r["config"]
    lines = [f"Mixed-adapter LoRA batches, {env['device']}, python {env['python']}, torch {env['torch']}, diffusers "
             f"{env['diffusers']}, peft {env['peft']}, {env['date']}; {c['steps']} steps at guidance "
             f"{c['guidance']:g}, {c['adapters']} adapters (row i takes i mod {c['adapters']}), median of "
             f"{c['repeat']} after {c['warmup']} warm-up; ms per call, × the no-LoRA batch of the same run", ""]
    for s in r["sizes"]:
        lines += [f"**{s['size']}** ({s['image']}, UNet {s['unet_params_m']:g}M, {s['dtype']})", "",
                  "| rank (pool rank, K) | rows | adapters | " + " | ".join(LABELS.values()) +
                  " | per adapter / mixed | steps only: mixed / none |", "|---" * 10 + "|"]
        for rk in s["ranks"]:
            for pt in rk["points"]:
                t = pt["contenders"]
                cells = [f"{t[n]['ms']:.1f} ({t[n]['ratio']:.2f}×)" + (f", {t[n]['batches']} batches"
                         if t[n]["batches"] > 1 else "") for n in CONTENDERS]
                steps = t["mixed"]["sample_ms"] / t["none"]["sample_ms"]
                lines.append(f"| {rk['rank']} ({rk['max_rank']}, {rk['per_row']}) | {pt['rows']} | {pt['adapters']} | "
                             + " | ".join(cells) + f" | **{pt['per_adapter_over_mixed']:.2f}×** | {steps:.2f}× |")
        lines.append("")
        for rk in s["ranks"]:
            for pt in rk.get("compiled", []):
                lines.append(f"Compiled fast path, rank {rk['rank']}, {pt['rows']} rows: no LoRA {pt['none_ms']:.1f} "
                             f"ms, mixed {pt['mixed_ms']:.1f} ms (**{pt['mixed_over_none']:.2f}×**).")
        for rk in s["ranks"]:
            gaps = ", ".join(f"{k} {v:.1e}" for k, v in rk["parity"].items())
            lines.append(f"Parity, rank {rk['rank']} (max |Δ| of [0, 1] images): {gaps}.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
