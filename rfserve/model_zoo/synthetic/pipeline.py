"""The paced synthetic model, for benchmarks only.

Each step of a batch of n images takes `ms_per_batch + n * ms_per_image` of wall time (default 5.5 ms an
image, the H100 target), spent in `time.sleep`, which releases the GIL as a CUDA synchronise does; a request
takes as many steps as it asks for (one by default), so the continuous batcher's benchmark can mix short and
long requests on it. The time taken to fetch the images counts towards the last step. Each image is a crop of
a real photograph, resized to the requested size and picked by the seed (one of 16 variants per size, prepared
once), so it compresses like the output of a real model and the host side pays what it would pay for one.

SPEC: `synthetic[=FOLDER][?ms_per_image=N&ms_per_batch=M&sizes=WxH,...]`. FOLDER holds the photographs
(.jpg, .jpeg, .png); without it, matplotlib's sample photograph (the `bench` extra) is used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rfserve.model_zoo.base import BatchOutput, ImageDefaults, ImageSpec, LoadedModel, ModelCard, parse_size
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.presets import ModelSpec
from rfserve.model_zoo.running import Running, Stepped

VARIANTS = 16
DEFAULT_SIZES = "512x512,1024x1024"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SyntheticPipeline(Stepped):
    family = "synthetic"
    photos: list[Image.Image]
    ms_per_image: float = 5.5
    ms_per_batch: float = 0.0
    _variants: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)

    def image(self, spec: ImageSpec) -> np.ndarray:
        """(H, W, 3) uint8: variant `seed % 16` at this size, a seeded crop of one of the photographs."""
        key = (spec.width, spec.height, spec.seed % VARIANTS)
        if key not in self._variants:
            rng = np.random.default_rng(key[2])
            photo = self.photos[key[2] % len(self.photos)]
            scale = rng.uniform(0.6, 1.0)                      # the crop keeps the output's aspect ratio
            crop_w = min(photo.width, photo.height * spec.width / spec.height) * scale
            crop_h = crop_w * spec.height / spec.width
            left = rng.uniform(0, photo.width - crop_w)
            top = rng.uniform(0, photo.height - crop_h)
            crop = photo.resize((spec.width, spec.height), Image.Resampling.BILINEAR,
                                box=(left, top, left + crop_w, top + crop_h))
            self._variants[key] = np.asarray(crop.convert("RGB"))
        return self._variants[key]

    def begin(self, specs: list[ImageSpec]) -> Running:
        return Running(specs, [False] * len(specs), [s.steps for s in specs], {})

    def step(self, running: Running) -> None:
        """Sleeps out the pace, less what fetching the images of the rows it finishes took."""
        start = time.perf_counter()
        running.advance()
        for i in running.finished():
            self.image(running.specs[i])
        pace = (self.ms_per_batch + self.ms_per_image * len(running)) / 1000.0
        time.sleep(max(0.0, pace - (time.perf_counter() - start)))

    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        return np.stack([self.image(running.specs[i]) for i in rows])

    def finish(self, running: Running, rows: list[int]) -> BatchOutput:
        images = np.stack([self.image(running.specs[i]) for i in rows])                     # (n, H, W, 3)
        running.leave(rows)
        return BatchOutput(images, [False] * len(rows), {})

    def kept_prompt(self, prompt: str) -> str:
        return prompt                                  # prompts are never truncated: they are not read

    def prompt_tokens(self, prompt: str) -> int:
        return 0                                       # nothing reads the prompt

    def fast_path(self) -> None:
        return None


def _photos(folder: Path | None) -> list[Image.Image]:
    if folder is None:
        try:
            import matplotlib
        except ModuleNotFoundError:
            raise CheckpointError("the synthetic model's default photograph ships with matplotlib: "
                                  "pip install 'rfserve[bench]', or give a folder: --model synthetic=FOLDER") from None
        paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if not paths:
            raise CheckpointError(f"{folder}: no .jpg, .jpeg or .png photographs for the synthetic model")
    return [Image.open(p).convert("RGB") for p in paths]


def _number(spec: ModelSpec, key: str, default: float) -> float:
    raw = spec.options.get(key)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        raise CheckpointError(f"--model {spec.name}: ?{key} must be a number of milliseconds, got {raw!r}") from None
    if value < 0:
        raise CheckpointError(f"--model {spec.name}: ?{key} must not be negative")
    return value


def load_synthetic(spec: ModelSpec, root: Path | None, device, dtype) -> LoadedModel:
    sizes = tuple(s.strip().lower() for s in spec.options.get("sizes", DEFAULT_SIZES).split(",") if s.strip())
    for size in sizes:
        try:
            width, height = parse_size(size)
        except ValueError:
            raise CheckpointError(f"--model {spec.name}: ?sizes takes WxH,WxH,... (got {size!r})") from None
        if not (8 <= width <= 4096 and 8 <= height <= 4096):
            raise CheckpointError(f"--model {spec.name}: sizes must be 8 to 4096 pixels a side (got {size})")
    pipe = SyntheticPipeline(_photos(root), _number(spec, "ms_per_image", 5.5), _number(spec, "ms_per_batch", 0.0))
    card = ModelCard(name=spec.name, family="synthetic", defaults=ImageDefaults(1, 0.0, size=sizes[0]),
                     sizes=sizes, supports_negative_prompt=False)
    return LoadedModel(card, pipe)
