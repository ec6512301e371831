"""End-to-end recipe for the shipped rf-shapes weights: VAE -> 1-RF teacher -> reflow pairs -> 2-RF
-> one-step distillation, then export (fp16, InstaFlow layout) and evaluation. A count classifier trained after the
teacher (`counter.py`) ships beside the 2-RF weights as its sampler's guide, and with `count_guidance` set it also
steers both pair ODEs.

    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_run            # full preset, ~90 min on a quiet 2-core CPU
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_tiny --preset tiny
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_run --preset counting --resume  # count guidance
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_gpu --device cuda   # same stages on a GPU

Every stage is seeded; stage results are cached under OUT/stages so `--resume` skips finished stages, and each
training stage saves its state every 250 steps there, so `--resume` also goes on with a stage stopped part-way.
Losses, timings and evaluation figures go to OUT/train_log.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import counter, stages
from .checker import check
from .config import PRESETS, TrainConfig, preset, stage_settings
from .data import Scene, make_batch, sample_scene
from .eval import evaluate_checkpoints
from .export import folder_size_mb, save_pipeline
from .guide import save_count_guide
from .models import build_text_encoder, build_unet, build_vae
from .sampling import decode, generate
from .tokenizer import build_tokenizer


class Run:
    """Output folder, JSON log and per-stage cache of one training run.

    Each stage's cache sits beside the settings it was made with (`config.stage_settings`); `--resume` reuses a
    finished stage, or goes on with a stage stopped part-way, only while those settings are unchanged, so a changed
    recipe never continues from results of another."""

    def __init__(self, out: Path, resume: bool, device: torch.device, cfg: TrainConfig):
        self.out, self.resume, self.device, self.cfg = out, resume, device, cfg
        (out / "stages").mkdir(parents=True, exist_ok=True)
        self.log: dict = {}
        log_file = out / "train_log.json"
        self.previous = json.loads(log_file.read_text()) if resume and log_file.exists() else {}
        if not resume:  # a fresh run starts every stage from its first step
            for stale in (out / "stages").glob("*.partial.pt"):
                stale.unlink()

    def partial(self, name: str) -> Path:
        """Where a training stage keeps its mid-stage state; `stage` removes it once the stage is cached."""
        return self.out / "stages" / f"{name}.partial.pt"

    def save_log(self) -> None:
        (self.out / "train_log.json").write_text(json.dumps(self.log, indent=2, default=str) + "\n")

    def stage(self, name: str, fn, templates: dict):
        """Run fn() -> dict of modules/tensors and cache it, or with --resume load it into `templates`."""
        path, marker = self.out / "stages" / f"{name}.safetensors", self.out / "stages" / f"{name}.json"
        start = time.perf_counter()
        settings = json.dumps(stage_settings(self.cfg, name), sort_keys=True)
        if not (marker.exists() and marker.read_text() == settings):  # another recipe's results
            path.unlink(missing_ok=True)
            self.partial(name).unlink(missing_ok=True)
            marker.write_text(settings)
        if self.resume and path.exists():
            flat = load_file(path)
            for key, t in templates.items():
                if isinstance(t, torch.nn.Module):
                    t.load_state_dict({k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")})
                else:
                    templates[key] = flat[key].to(self.device)
            # Keep the losses and timings the cached stage logged when it ran.
            self.log[name] = {**self.log.get(name, {}), **self.previous.get(name, {}), "resumed": True}
            return templates
        partial = self.partial(name)
        # A stage stopped mid-way already ran for the seconds its checkpoint holds.
        before = torch.load(partial, weights_only=True, mmap=True)["seconds"] if partial.exists() else 0.0
        result = fn()
        flat = {}
        for key, t in result.items():
            items = t.state_dict().items() if isinstance(t, torch.nn.Module) else [(None, t)]
            flat.update({(key if k is None else f"{key}.{k}"): v.detach().cpu().contiguous() for k, v in items})
        save_file(flat, path)
        partial.unlink(missing_ok=True)
        self.log.setdefault(name, {})["seconds"] = round(before + time.perf_counter() - start, 1)
        self.save_log()
        return result


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def render_dataset(seed: int, n: int, chunk: int = 1000) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for i in tqdm(range(0, n, chunk), desc="render dataset", mininterval=5):
        im, _, cap = make_batch(seed * 1_000_003 + i, min(chunk, n - i))
        images.append(im), captions.extend(cap)
    return np.concatenate(images), captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64) in [-1, 1]


def count_classifier(cfg: TrainConfig, run: Run, vae, gen: torch.Generator) -> counter.CountClassifier:
    """The counter stage: the classifier trained on the VAE's latents of `counting_set` renders, its held-out
    accuracy by t logged."""
    images, counts = counter.counting_set(cfg.seed + 13, cfg.counter_samples)
    held = len(images) // 12  # the last twelfth is held out for the accuracy figures
    latents = stages.encode_latents(vae, to_tensor(images).to(run.device)) * vae.config.scaling_factor
    counts_t = torch.from_numpy(counts).to(run.device)
    run.log["counter"] = {"loss": []}
    out = run.stage("counter", lambda: {"classifier": counter.train_counter(
        counter.CountClassifier(cfg.model.latent_channels).to(run.device), latents[:-held], counts_t[:-held],
        cfg.counter, gen, run.log["counter"]["loss"], run.partial("counter"))},
        {"classifier": counter.CountClassifier(cfg.model.latent_channels).to(run.device)})
    classifier = out["classifier"].eval()
    run.log["counter"]["held_out_accuracy_by_t"] = {
        str(t): counter.accuracy(classifier, latents[-held:], counts_t[-held:], t, gen) for t in (0.2, 0.4, 1.0)}
    return classifier


def gen_for(cfg: TrainConfig, stage: int) -> torch.Generator:
    """One random stream per stage, so a cached stage never shifts the others."""
    return torch.Generator().manual_seed(cfg.seed * 1000 + stage)


def train(cfg: TrainConfig, run: Run) -> dict:
    torch.manual_seed(cfg.seed)
    gen = lambda k: gen_for(cfg, k)  # noqa: E731
    log, dev = run.log, run.device
    log["config"] = dataclasses.asdict(cfg)
    tokenizer = build_tokenizer()
    empty_ids = tokenize(tokenizer, [""])[0].to(dev)

    images, captions = render_dataset(cfg.seed, cfg.dataset_size)
    pixels, ids = to_tensor(images).to(dev), tokenize(tokenizer, captions).to(dev)

    vae = build_vae(cfg.model).to(dev)
    log["vae"] = {"loss": []}

    def vae_stage():
        stages.train_vae(vae, pixels, cfg.vae, cfg.kl_weight, cfg.vae_edge_weight, gen(1), log["vae"]["loss"],
                         run.partial("vae"))
        std = stages.encode_latents(vae, pixels[:2048]).std().item()
        return {"vae": vae, "scaling_factor": torch.tensor([1.0 / std])}
    vae_out = run.stage("vae", vae_stage, {"vae": vae, "scaling_factor": None})
    vae.register_to_config(scaling_factor=float(vae_out["scaling_factor"][0]))
    vae.eval().requires_grad_(False)
    held, held_scenes, _ = make_batch(cfg.seed + 7, 256, held_out=True)
    recon = decode(vae, stages.encode_latents(vae, to_tensor(held).to(dev)) * vae.config.scaling_factor)
    log["vae"].update(scaling_factor=vae.config.scaling_factor, checker_on_reconstructions=check(recon, held_scenes))
    latents = stages.encode_latents(vae, pixels) * vae.config.scaling_factor  # (N, C, h, w), unit std
    del pixels

    def teacher_eval(unet, te, steps: int) -> dict:
        """At the ODE steps that make its pairs, and at 25 steps, where a teacher must count before distilling."""
        comps = {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tokenizer}
        _, scenes, caps = make_batch(cfg.seed + 11, 128, held_out=True)
        out = {}
        for n in sorted({steps, 25}):
            images = generate(comps, caps, list(range(len(caps))), steps=n, guidance=cfg.reflow_guidance)
            out[str(n)] = {"steps": n, "guidance": cfg.reflow_guidance, "held_out_adherence": check(images, scenes)}
        return out

    unet, te = build_unet(cfg.model).to(dev), build_text_encoder(cfg.model, tokenizer).to(dev)
    log["teacher"] = {"loss": []}
    t_out = run.stage("teacher", lambda: dict(zip(("unet", "text_encoder"), stages.train_teacher(
        unet, te, latents, ids, empty_ids, cfg.teacher, cfg.caption_dropout, gen(2), log["teacher"]["loss"],
        run.partial("teacher")))),
        {"unet": build_unet(cfg.model).to(dev), "text_encoder": build_text_encoder(cfg.model, tokenizer).to(dev)})
    teacher, te = t_out["unet"].eval(), t_out["text_encoder"].eval().requires_grad_(False)
    log["teacher"]["eval"] = teacher_eval(teacher, te, cfg.reflow_ode_steps)
    run.save_log()

    classifier = count_classifier(cfg, run, vae, gen(7)) if cfg.count_guidance or cfg.served_count_guidance else None
    guide = counter.CountGuide(classifier, cfg.count_guidance) if cfg.count_guidance else None

    def pair_captions(seed: int, n: int) -> tuple[torch.Tensor, list[Scene], torch.Tensor]:
        """Token ids, scenes and counts of n training-split captions."""
        rng, scenes, captions = np.random.default_rng(seed), [], []
        for _ in range(n):  # scene then caption, in the order the shipped weights' pairs drew them
            scenes.append(sample_scene(rng))
            captions.append(scenes[-1].caption(rng))
        return tokenize(tokenizer, captions).to(dev), scenes, torch.tensor([s.count for s in scenes], device=dev)

    def pairs_stage(name: str, model, ids, scenes, counts, ode_steps: int, stage_gen: int) -> dict:
        """A pair stage, with how often the checker reads its first 256 targets right (what a student can learn)."""
        pairs = run.stage(name, lambda: dict(zip(("noise", "ends"), stages.make_pairs(
            model, te, ids, empty_ids, ode_steps, cfg.reflow_guidance, gen(stage_gen), counts=counts,
            count_guide=guide))), {"noise": None, "ends": None})
        log.setdefault(name, {})["checker_on_targets"] = check(decode(vae, pairs["ends"][:256]), scenes[:256])
        return pairs

    pair_ids, pair_scenes, pair_counts = pair_captions(cfg.seed + 3, cfg.reflow_pairs)
    pairs = pairs_stage("reflow_pairs", teacher, pair_ids, pair_scenes, pair_counts, cfg.reflow_ode_steps, 3)

    log["rf2"] = {"loss": []}
    rf2 = run.stage("rf2", lambda: {"unet": stages.train_reflow(
        copy.deepcopy(teacher), te, pairs["noise"], pairs["ends"], pair_ids, empty_ids, cfg.rf2,
        cfg.caption_dropout, cfg.anneal_fraction, gen(4), log["rf2"]["loss"], run.partial("rf2"))},
        {"unet": build_unet(cfg.model).to(dev)})["unet"].eval()
    log["rf2"]["eval"] = teacher_eval(rf2, te, cfg.distill_ode_steps)
    run.save_log()

    distill_ids, distill_scenes, distill_counts = pair_captions(cfg.seed + 5, cfg.distill_pairs)
    dpairs = pairs_stage("distill_pairs", rf2, distill_ids, distill_scenes, distill_counts, cfg.distill_ode_steps, 5)

    log["one_step"] = {"loss": []}
    one_step = run.stage("one_step", lambda: {"unet": stages.train_one_step(
        copy.deepcopy(rf2), te, dpairs["noise"], dpairs["ends"], distill_ids, cfg.distill, gen(6),
        log["one_step"]["loss"], run.partial("one_step"))}, {"unet": build_unet(cfg.model).to(dev)})["unet"].eval()

    shared = {"vae": vae, "text_encoder": te, "tokenizer": tokenizer}
    folders = {"rf-shapes": run.out / "rf-shapes", "rf-shapes-2rf": run.out / "rf-shapes-2rf"}
    save_pipeline(folders["rf-shapes"], {**shared, "unet": one_step})
    save_pipeline(folders["rf-shapes-2rf"], {**shared, "unet": rf2})
    if cfg.served_count_guidance:
        save_count_guide(folders["rf-shapes-2rf"], counter.CountGuide(classifier, cfg.served_count_guidance))
    log["checkpoint_mb"] = {k: round(folder_size_mb(f), 2) for k, f in folders.items()}
    run.save_log()
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--seed", type=int, default=0)
    # The shipped weights were trained with 2 threads; another count changes float summation order, so the
    # weights differ in the last bits. On a quiet 2-core CPU two threads measured 1.55x faster than one.
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="reuse the stages cached under OUT/stages and go on with one stopped part-way, "
                         "while their settings are unchanged")
    ap.add_argument("--device", default="cpu", help="torch device for training; evaluation runs on the CPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset, seed=args.seed)
    run = Run(args.out, args.resume, torch.device(args.device), cfg)
    start = time.perf_counter()
    run.log["environment"] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                              "threads": args.threads, "device": args.device,
                              "date": datetime.now(timezone.utc).isoformat()}
    folders = train(cfg, run)
    run.log["train_seconds"] = round(time.perf_counter() - start, 1)
    # With --resume, the wall time above excludes cached stages; this sums what each stage took when it ran.
    run.log["stage_seconds_total"] = round(sum(v.get("seconds", 0) for v in run.log.values() if isinstance(v, dict)), 1)
    run.log["eval"] = evaluate_checkpoints(folders, cfg.eval_samples)
    run.log["total_seconds"] = round(time.perf_counter() - start, 1)
    run.save_log()
    print(json.dumps({k: run.log[k] for k in ("train_seconds", "stage_seconds_total", "checkpoint_mb", "eval")},
                     indent=2))


if __name__ == "__main__":
    main()
