"""Evaluation: checker accuracy, prompt adherence on held-out combinations, Fréchet distance.

Run `python -m rfserve.model_zoo.rf_shapes.eval` to evaluate the shipped checkpoints through the serving
pipeline (`InstaFlowPipeline`) and print the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import linalg

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline

from .checker import MIN_BLOB_FRACTION, check, read
from .data import make_batch, parse_caption
from .presets import CHECKPOINT_DIR, RF_SHAPES_DEFAULTS
from .vocabulary import VOCABULARY

# generate(prompts, seeds, steps, guidance, negative_prompt) -> uint8 (B, 64, 64, 3)
Generator = Callable[[list[str], list[int], int, float, str], np.ndarray]
EVAL_SEED = 1234  # scenes and captions of the eval set
NOISE_SEED = 10_000  # sample i uses noise seed NOISE_SEED + i


def checker_accuracy(n: int, seed: int = 99) -> dict[str, float]:
    """Checker vs ground truth on procedural images of both splits."""
    out = {}
    for split, held in (("train_split", False), ("held_out_split", True)):
        images, scenes, _ = make_batch(seed, n, held_out=held)
        out[split] = check(images, scenes)
    return out


def features(images: np.ndarray) -> np.ndarray:
    return np.stack([read(img).features for img in images])  # (B, FEATURE_DIM)


def frechet_distance(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a and b, in units of ref's per-feature std."""
    scale = np.maximum(ref.std(0), 1e-3)
    a, b = a / scale, b / scale
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def evaluate(models: dict[str, tuple[Generator, dict]], n: int) -> dict:
    """Adherence on held-out prompts and Fréchet distance to real images, per model.

    models: name -> (generate function, sampling settings {steps, guidance, negative_prompt}).
    Both the real images and the prompts come from the held-out split with the same scenes.
    """
    real, scenes, captions = make_batch(EVAL_SEED, n, held_out=True)
    real_feats = features(real)
    half = n // 2
    out: dict = {"n": n, "real_vs_real_half_fd": frechet_distance(real_feats[:half], real_feats[half:], real_feats)}
    seeds = [NOISE_SEED + i for i in range(n)]
    for name, (generate, settings) in models.items():
        start = time.perf_counter()
        images = generate(captions, seeds, settings["steps"], settings["guidance"], settings["negative_prompt"])
        seconds = time.perf_counter() - start
        out[name] = {**settings, "adherence": check(images, scenes),
                     "fd_to_real": frechet_distance(features(images), real_feats, real_feats),
                     "seconds_per_image": seconds / n}
    return out


def pipeline_generator(path: Path) -> Generator:
    """Generate through the serving pipeline, in chunks of 64 images."""
    pipe = InstaFlowPipeline.from_pretrained(path)

    def generate(prompts, seeds, steps, guidance, negative):
        return np.concatenate([
            pipe.generate(prompts[i:i + 64], seeds[i:i + 64], steps=steps, guidance=guidance,
                          negative_prompts=[negative] * len(prompts[i:i + 64]))
            for i in range(0, len(prompts), 64)])
    return generate


def first_example(generate: Generator, settings: dict, seeds: range = range(100)) -> dict[str, float]:
    """How often the first example a user sees (the README's, the banner's: `VOCABULARY.examples[0]`) comes out right
    over `seeds`: every attribute as the checker reads it, and with no blob dropped as a fragment, as a reader
    counts."""
    prompt = VOCABULARY.examples[0]
    scene = parse_caption(prompt)
    images = generate([prompt] * len(seeds), list(seeds), settings["steps"], settings["guidance"],
                      settings["negative_prompt"])
    right = [[all(read(image, fragments).matches(scene).values()) for image in images]
             for fragments in (MIN_BLOB_FRACTION, 0.0)]
    return {"prompt": prompt, "seeds": f"{seeds.start}-{seeds.stop - 1}", "checker": float(np.mean(right[0])),
            "no_fragment_dropped": float(np.mean(right[1]))}


def _settings(preset: str, **override) -> dict:
    d = RF_SHAPES_DEFAULTS[preset]
    return {"steps": d["steps"], "guidance": d["guidance"], "negative_prompt": d["negative_prompt"], **override}


def evaluate_checkpoints(folders: dict[str, Path], n: int) -> dict:
    """All figures for the one-step model (preset defaults) and the 2-RF teacher (25 steps and preset)."""
    one_step, teacher = pipeline_generator(folders["rf-shapes"]), pipeline_generator(folders["rf-shapes-2rf"])
    models = {"rf-shapes": (one_step, _settings("rf-shapes")),
              "rf-shapes-2rf@25": (teacher, _settings("rf-shapes-2rf", steps=25)),
              "rf-shapes-2rf": (teacher, _settings("rf-shapes-2rf"))}
    result = {"checker": checker_accuracy(n), **evaluate(models, n)}
    for name in RF_SHAPES_DEFAULTS:
        result[name]["first_example"] = first_example(*models[name])
    result["fd_ratio_one_step_vs_teacher25"] = (result["rf-shapes"]["fd_to_real"]
                                                / result["rf-shapes-2rf@25"]["fd_to_real"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("-n", type=int, default=384, help="eval images per model")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    folders = {name: args.checkpoints / name for name in RF_SHAPES_DEFAULTS}
    text = json.dumps(evaluate_checkpoints(folders, args.n), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
