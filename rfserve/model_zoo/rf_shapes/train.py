"""End-to-end recipe for the shipped rf-shapes weights: VAE -> 1-RF teacher -> reflow pairs -> 2-RF
-> one-step distillation, then export (fp16, InstaFlow layout) and evaluation. A count classifier trained after the
teacher (`counter.py`) ships beside the 2-RF weights as its sampler's guide; with `count_guidance` set it also
steers both pair ODEs. A last stage tunes the one-step model (`tuning.py`): `tune_count_weight` rewards its counts
by that classifier, `tune_match_weight` matches its samples' distribution to the 2-RF's, and `tune_gan_weight`
makes them pass for renders of their captions.

    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_run            # full preset, ~90 min on a quiet 2-core CPU
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_tiny --preset tiny
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_run --preset counting --resume  # count guidance
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_gpu --device cuda   # same stages on a GPU
    python -m rfserve.model_zoo.rf_shapes.train --out /tmp/rfshapes_1 --preset counting \
        --from-2rf rfserve/model_zoo/rf_shapes/checkpoints/rf-shapes-2rf     # only the one-step stages, from a 2-RF

Every stage is seeded; stage results are cached under OUT/stages so `--resume` skips finished stages, and each
training stage saves its state every 250 steps there, so `--resume` also goes on with a stage stopped part-way.
Losses, timings and evaluation figures go to OUT/train_log.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from . import counter, stages, tuning
from .checker import check
from .config import PRESETS, TrainConfig, preset, stage_settings
from .data import Scene, make_batch, sample_scene
from .eval import evaluate_checkpoints
from .export import folder_size_mb, save_pipeline
from .guide import GUIDE_FOLDER, load_count_guide, save_count_guide
from .models import build_text_encoder, build_unet, build_vae, latent_size
from .sampling import decode, generate
from .tokenizer import build_tokenizer


class Run:
    """Output folder, JSON log and per-stage cache of one training run.

    Each stage's cache sits beside the settings it was made with (`config.stage_settings`); `--resume` reuses a
    finished stage, or goes on with a stage stopped part-way, only while those settings are unchanged, so a changed
    recipe never continues from results of another. `origin` identifies what a run starts from other than the recipe
    (a served 2-RF folder, by its digest, not its path); it is part of every stage's settings."""

    def __init__(self, out: Path, resume: bool, device: torch.device, cfg: TrainConfig, origin: dict | None = None):
        self.out, self.resume, self.device, self.cfg, self.origin = out, resume, device, cfg, origin or {}
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
        settings = json.dumps({**stage_settings(self.cfg, name), **self.origin}, sort_keys=True)
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


def empty_ids(tokenizer, device) -> torch.Tensor:
    """Token ids (L,) of the empty caption, which CFG samples against."""
    return tokenize(tokenizer, [""])[0].to(device)


def render_dataset(seed: int, n: int, chunk: int = 1000) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for i in tqdm(range(0, n, chunk), desc="render dataset", mininterval=5):
        im, _, cap = make_batch(seed * 1_000_003 + i, min(chunk, n - i))
        images.append(im), captions.extend(cap)
    return np.concatenate(images), captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64) in [-1, 1]


def scaled_latents(vae, images: np.ndarray, device) -> torch.Tensor:
    """The VAE's latents (N, C, h, w) of renders (N, 64, 64, 3), scaled to the unit std the flows were trained on."""
    return stages.encode_latents(vae, to_tensor(images).to(device)) * vae.config.scaling_factor


def count_classifier(cfg: TrainConfig, run: Run, vae, gen: torch.Generator) -> counter.CountClassifier:
    """The counter stage: the classifier trained on the VAE's latents of `counting_set` renders, its held-out
    accuracy by t logged."""
    images, counts = counter.counting_set(cfg.seed + 13, cfg.counter_samples)
    held = len(images) // 12  # the last twelfth is held out for the accuracy figures
    latents = scaled_latents(vae, images, run.device)
    counts_t = torch.from_numpy(counts).to(run.device)
    run.log["counter"] = {"loss": []}
    out = run.stage("counter", lambda: {"classifier": counter.train_counter(
        counter.CountClassifier(cfg.model.latent_channels).to(run.device), latents[:-held], counts_t[:-held],
        cfg.counter, gen, run.log["counter"]["loss"], run.partial("counter"))},
        {"classifier": counter.CountClassifier(cfg.model.latent_channels).to(run.device)})
    classifier = out["classifier"].eval().requires_grad_(False)
    run.log["counter"]["held_out_accuracy_by_t"] = {
        str(t): counter.accuracy(classifier, latents[-held:], counts_t[-held:], t, gen) for t in (0.2, 0.4, 1.0)}
    return classifier


def gen_for(cfg: TrainConfig, stage: int) -> torch.Generator:
    """One random stream per stage, so a cached stage never shifts the others."""
    return torch.Generator().manual_seed(cfg.seed * 1000 + stage)


@dataclass
class Parts:
    """What the later stages and the export share: the VAE, the text side, the counting classifier (None where no
    stage needs it) and, once trained or loaded, the 2-RF UNet."""
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    classifier: counter.CountClassifier | None
    rf2: UNet2DConditionModel | None = None


def needs_classifier(cfg: TrainConfig) -> bool:
    return bool(cfg.count_guidance or cfg.served_count_guidance or cfg.tune_count_weight
                or cfg.tune_match_count_guidance)


def teacher_eval(cfg: TrainConfig, parts: Parts, unet, steps: int) -> dict:
    """At the ODE steps that make its pairs, and at 25 steps, where a teacher must count before distilling."""
    comps = {"unet": unet, "vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer}
    _, scenes, caps = make_batch(cfg.seed + 11, 128, held_out=True)
    out = {}
    for n in sorted({steps, 25}):
        images = generate(comps, caps, list(range(len(caps))), steps=n, guidance=cfg.reflow_guidance)
        out[str(n)] = {"steps": n, "guidance": cfg.reflow_guidance, "held_out_adherence": check(images, scenes)}
    return out


def pair_captions(parts: Parts, seed: int, n: int, device) -> tuple[torch.Tensor, list[Scene], torch.Tensor]:
    """Token ids, scenes and counts of n training-split captions."""
    rng, scenes, captions = np.random.default_rng(seed), [], []
    for _ in range(n):  # scene then caption, in the order the shipped weights' pairs drew them
        scenes.append(sample_scene(rng))
        captions.append(scenes[-1].caption(rng))
    counts = torch.tensor([s.count for s in scenes], device=device)
    return tokenize(parts.tokenizer, captions).to(device), scenes, counts


def pairs_stage(cfg: TrainConfig, run: Run, parts: Parts, name: str, model, captions: tuple, ode_steps: int,
                stage_gen: int) -> dict:
    """A pair stage, with how often the checker reads its first 256 targets right (what a student can learn)."""
    ids, scenes, counts = captions
    guide = counter.CountGuide(parts.classifier, cfg.count_guidance) if cfg.count_guidance else None
    pairs = run.stage(name, lambda: dict(zip(("noise", "ends"), stages.make_pairs(
        model, parts.text_encoder, ids, empty_ids(parts.tokenizer, run.device), ode_steps, cfg.reflow_guidance,
        gen_for(cfg, stage_gen), counts=counts, count_guide=guide))), {"noise": None, "ends": None})
    run.log.setdefault(name, {})["checker_on_targets"] = check(decode(parts.vae, pairs["ends"][:256]), scenes[:256])
    return pairs


def train_2rf(cfg: TrainConfig, run: Run) -> Parts:
    """The stages up to the 2-RF model: VAE, 1-RF teacher, counting classifier, reflow pairs, 2-RF."""
    gen = lambda k: gen_for(cfg, k)  # noqa: E731
    log, dev = run.log, run.device
    tokenizer = build_tokenizer()
    empty = empty_ids(tokenizer, dev)

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
    recon = decode(vae, scaled_latents(vae, held, dev))
    log["vae"].update(scaling_factor=vae.config.scaling_factor, checker_on_reconstructions=check(recon, held_scenes))
    latents = stages.encode_latents(vae, pixels) * vae.config.scaling_factor  # (N, C, h, w), unit std
    del pixels

    unet, te = build_unet(cfg.model).to(dev), build_text_encoder(cfg.model, tokenizer).to(dev)
    log["teacher"] = {"loss": []}
    t_out = run.stage("teacher", lambda: dict(zip(("unet", "text_encoder"), stages.train_teacher(
        unet, te, latents, ids, empty, cfg.teacher, cfg.caption_dropout, gen(2), log["teacher"]["loss"],
        run.partial("teacher")))),
        {"unet": build_unet(cfg.model).to(dev), "text_encoder": build_text_encoder(cfg.model, tokenizer).to(dev)})
    teacher, te = t_out["unet"].eval(), t_out["text_encoder"].eval().requires_grad_(False)
    parts = Parts(vae, te, tokenizer, None)
    log["teacher"]["eval"] = teacher_eval(cfg, parts, teacher, cfg.reflow_ode_steps)
    run.save_log()
    if needs_classifier(cfg):
        parts.classifier = count_classifier(cfg, run, vae, gen(7))

    pair_ids = pair_captions(parts, cfg.seed + 3, cfg.reflow_pairs, dev)
    pairs = pairs_stage(cfg, run, parts, "reflow_pairs", teacher, pair_ids, cfg.reflow_ode_steps, 3)

    log["rf2"] = {"loss": []}
    parts.rf2 = run.stage("rf2", lambda: {"unet": stages.train_reflow(
        copy.deepcopy(teacher), te, pairs["noise"], pairs["ends"], pair_ids[0], empty, cfg.rf2,
        cfg.caption_dropout, cfg.anneal_fraction, gen(4), log["rf2"]["loss"], run.partial("rf2"))},
        {"unet": build_unet(cfg.model).to(dev)})["unet"].eval()
    log["rf2"]["eval"] = teacher_eval(cfg, parts, parts.rf2, cfg.distill_ode_steps)
    run.save_log()
    return parts


def folder_digest(folder: Path) -> str:
    """sha256 over a folder's files, names and bytes: which 2-RF a --from-2rf run's stages were made from."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def load_2rf(cfg: TrainConfig, folder: Path, device: torch.device) -> Parts:
    """The parts of a served 2-RF folder, in float32, for a run that trains only the one-step stages from it."""
    load = lambda cls, name: cls.from_pretrained(folder, subfolder=name).float().to(device).eval()  # noqa: E731
    guide = load_count_guide(folder, device=device)
    if guide is None and needs_classifier(cfg):
        raise SystemExit(f"{folder} ships no {GUIDE_FOLDER}/, which this preset's count stages need")
    return Parts(load(AutoencoderKL, "vae").requires_grad_(False),
                 load(CLIPTextModel, "text_encoder").requires_grad_(False),
                 build_tokenizer(),  # the recipe's word-level tokenizer, which every rf-shapes folder ships
                 None if guide is None else guide.classifier, load(UNet2DConditionModel, "unet"))


def gan_term(cfg: TrainConfig, parts: Parts, device) -> tuning.Adversarial:
    """The tuning's GAN term: the VAE's latents of tune_real_scenes training-split renders, their captions, and a
    fresh discriminator head for the 2-RF's mid-block (its own seed, so the head starts the same in every run)."""
    images, captions = render_dataset(cfg.seed + 17, cfg.tune_real_scenes)
    latents = scaled_latents(parts.vae, images, device)
    levels = len(cfg.model.unet_channels)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 1000 + 10)
        head = tuning.discriminator_head(cfg.model.unet_channels[-1], latent_size(cfg.model) // 2 ** (levels - 1))
    return tuning.Adversarial(head.to(device), latents, tokenize(parts.tokenizer, captions).to(device),
                              cfg.tune_gan_weight, cfg.tune_gan_head_weight)


def train_one_step(cfg: TrainConfig, run: Run, parts: Parts) -> UNet2DConditionModel:
    """Distillation pairs from the 2-RF ODE, one-step distillation, then the tuning the preset sets (`tuning.py`)."""
    log, dev, te = run.log, run.device, parts.text_encoder
    distill = pair_captions(parts, cfg.seed + 5, cfg.distill_pairs, dev)
    dpairs = pairs_stage(cfg, run, parts, "distill_pairs", parts.rf2, distill, cfg.distill_ode_steps, 5)

    log["one_step"] = {"loss": []}
    one_step = run.stage("one_step", lambda: {"unet": stages.train_one_step(
        copy.deepcopy(parts.rf2), te, dpairs["noise"], dpairs["ends"], distill[0], cfg.distill, gen_for(cfg, 6),
        log["one_step"]["loss"], run.partial("one_step"))}, {"unet": build_unet(cfg.model).to(dev)})["unet"].eval()
    if not (cfg.tune_count_weight or cfg.tune_match_weight):
        return one_step
    fresh_ids, _, fresh_counts = pair_captions(parts, cfg.seed + 9, cfg.tune_captions, dev)
    reward = tuning.Reward(parts.classifier, cfg.tune_count_weight, cfg.tune_count_t) if cfg.tune_count_weight else None
    matching = None
    if cfg.tune_match_weight:
        with torch.no_grad():
            uncond = te(empty_ids(parts.tokenizer, dev)[None])[0]  # (1, L, D)
        guide = counter.CountGuide(parts.classifier, cfg.tune_match_count_guidance) \
            if cfg.tune_match_count_guidance else None
        matching = tuning.Matching(parts.rf2, copy.deepcopy(parts.rf2), uncond, cfg.tune_match_guidance,
                                   cfg.tune_match_weight, guide, cfg.tune_fake_lr_scale)
    log["tune"] = {"loss": []}
    return run.stage("tune", lambda: {"unet": tuning.tune_one_step(  # renders the GAN's scenes only if it runs
        copy.deepcopy(one_step), te, dpairs["noise"], dpairs["ends"], distill[0], fresh_ids, fresh_counts, reward,
        matching, cfg.tune, gen_for(cfg, 8), log["tune"]["loss"], run.partial("tune"),
        gan_term(cfg, parts, dev) if cfg.tune_gan_weight else None)},
        {"unet": build_unet(cfg.model).to(dev)})["unet"].eval()


def train(cfg: TrainConfig, run: Run, from_2rf: Path | None = None) -> dict:
    """Every stage, or with `from_2rf` only the one-step stages from a served 2-RF folder; exports both folders."""
    torch.manual_seed(cfg.seed)
    run.log["config"] = dataclasses.asdict(cfg)
    parts = train_2rf(cfg, run) if from_2rf is None else load_2rf(cfg, from_2rf, run.device)
    one_step = train_one_step(cfg, run, parts)

    shared = {"vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer}
    folders = {"rf-shapes": run.out / "rf-shapes", "rf-shapes-2rf": run.out / "rf-shapes-2rf"}
    save_pipeline(folders["rf-shapes"], {**shared, "unet": one_step})
    save_pipeline(folders["rf-shapes-2rf"], {**shared, "unet": parts.rf2})
    if cfg.served_count_guidance:
        save_count_guide(folders["rf-shapes-2rf"], counter.CountGuide(parts.classifier, cfg.served_count_guidance))
    run.log["checkpoint_mb"] = {k: round(folder_size_mb(f), 2) for k, f in folders.items()}
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
    ap.add_argument("--from-2rf", type=Path, metavar="FOLDER",
                    help="train only the one-step stages, from a served rf-shapes-2rf folder (its VAE, text encoder, "
                         "2-RF UNet and count guide), which the output's rf-shapes-2rf folder then copies")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset, seed=args.seed)
    origin = None if args.from_2rf is None else {"from_2rf_sha256": folder_digest(args.from_2rf)}
    run = Run(args.out, args.resume, torch.device(args.device), cfg, origin)
    start = time.perf_counter()
    run.log["environment"] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                              "threads": args.threads, "device": args.device,
                              "date": datetime.now(timezone.utc).isoformat()}
    if origin:
        run.log["environment"].update(from_2rf=str(args.from_2rf), **origin)
    folders = train(cfg, run, args.from_2rf)
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
