"""Procedural shapes dataset: 64x64 images of 1-3 same-kind, same-colour shapes on a plain background.

Each image holds one shape kind in one colour, repeated `count` times, so its caption
("two red circles on a blue background") pins down everything the checker can verify:
colour, shape, count and background. Everything is derived from an integer seed; no files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # render at 4x and box-filter down, for anti-aliased edges

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 40),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "purple": (140, 45, 175),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
WORD_COUNTS = {w: n for n, words in COUNT_WORDS.items() for w in words}
SHAPE_NOUNS = frozenset(noun for shape in SHAPES for noun in (shape, shape + "s"))
COLOUR_JITTER = 12  # per-channel uniform jitter so colours are not a single point
# Radius range per count: more shapes -> smaller, so they fit without overlap.
RADIUS_RANGE = {1: (8.0, 15.0), 2: (6.0, 11.0), 3: (5.0, 9.0)}
MARGIN = 3  # minimum pixel gap between shapes and to the image border

# (colour, shape, background) triples never shown in training; the adherence eval uses them.
# Every colour, shape and background still appears in training in other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "circle", "blue"), ("orange", "square", "black"), ("yellow", "triangle", "purple"),
    ("green", "circle", "white"), ("blue", "square", "yellow"), ("purple", "triangle", "green"),
    ("white", "circle", "red"), ("black", "square", "orange"), ("red", "triangle", "white"),
    ("green", "square", "blue"), ("blue", "triangle", "red"), ("yellow", "circle", "black"),
})


@dataclass(frozen=True)
class Scene:
    """What an image shows; the caption and the checker both speak in these terms."""
    colour: str
    shape: str
    count: int
    background: str

    def caption(self, rng: np.random.Generator | None = None) -> str:
        words = COUNT_WORDS[self.count]
        count_word = words[int(rng.integers(len(words)))] if rng is not None else words[0]
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{count_word} {self.colour} {noun} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.background) in HELD_OUT


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption`; raises ValueError on text outside the grammar."""
    words = caption.lower().split()
    if len(words) != 7 or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"caption outside the grammar: {caption!r}")
    count_word, colour, noun, background = words[0], words[1], words[2], words[5]
    shape = noun[:-1] if noun.endswith("s") else noun
    if count_word not in WORD_COUNTS or colour not in PALETTE or background not in PALETTE or shape not in SHAPES:
        raise ValueError(f"caption outside the grammar: {caption!r}")
    return Scene(colour, shape, WORD_COUNTS[count_word], background)


def asked_count(prompt: str) -> int | None:
    """The count a prompt asks for: the count word nearest before its first shape noun ("two red circles", "a
    square on a blue background": 2, 1). None where no count word comes before a shape noun; such a row is sampled
    unsteered, as the UNet alone reads it."""
    words = re.findall(r"[a-z]+", prompt.lower())
    noun = next((i for i, w in enumerate(words) if w in SHAPE_NOUNS), 0)
    return next((WORD_COUNTS[w] for w in reversed(words[:noun]) if w in WORD_COUNTS), None)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = [w for ws in COUNT_WORDS.values() for w in ws] + list(COLOURS)
    words += [s for shape in SHAPES for s in (shape, shape + "s")] + ["on", "background"]
    return list(dict.fromkeys(words))


def all_scenes(held_out: bool) -> list[Scene]:
    """All scenes of the training split (held_out=False) or of the held-out split (True)."""
    return [Scene(c, s, n, b) for c in COLOURS for s in SHAPES for n in (1, 2, 3) for b in COLOURS
            if b != c and ((c, s, b) in HELD_OUT) == held_out]


def sample_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    scenes = all_scenes(held_out)
    return scenes[int(rng.integers(len(scenes)))]


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape on a (supersampled) pixel grid; r is the half-extent in pixels."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r ** 2
    if shape == "square":
        h = r * 0.9
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    # Upright isosceles triangle inside the box [cx-r, cx+r] x [cy-r, cy+r].
    rel = (ys - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
    return (rel >= 0) & (rel <= 1) & (np.abs(xs - cx) <= rel * r)


def _place(rng: np.random.Generator, count: int, radius_range: tuple[float, float] | None = None
           ) -> list[tuple[float, float, float]]:
    """Centres and half-extents of `count` shapes whose boxes keep MARGIN pixels apart; half-extents drawn from
    `radius_range`, by default the grammar's range for the count."""
    lo, hi = radius_range or RADIUS_RANGE[count]
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _attempt in range(50):
                r = float(rng.uniform(lo, hi))
                cx, cy = rng.uniform(r + MARGIN, IMAGE_SIZE - r - MARGIN, size=2)
                if all(max(abs(cx - x), abs(cy - y)) >= r + q + MARGIN for x, y, q in placed):
                    placed.append((float(cx), float(cy), r))
                    break
        if len(placed) == count:
            return placed


def _jittered(rng: np.random.Generator, colour: str) -> np.ndarray:
    base = np.array(PALETTE[colour], dtype=np.float32)
    return np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3), 0, 255)


def render(scene: Scene, rng: np.random.Generator, radius_range: tuple[float, float] | None = None) -> np.ndarray:
    """Draw a scene; returns uint8 (64, 64, 3). `radius_range` overrides the grammar's size for the count."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)  # (n, n) each, in output-pixel units
    mask = np.zeros((n, n), dtype=bool)
    for cx, cy, r in _place(rng, scene.count, radius_range):
        mask |= _shape_mask(scene.shape, cx, cy, r, xs, ys)
    bg, fg = _jittered(rng, scene.background), _jittered(rng, scene.colour)
    image = np.where(mask[..., None], fg, bg)  # (n, n, 3)
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))  # (64, 64, 3)
    return np.round(image).astype(np.uint8)


def make_batch(seed: int, n: int, held_out: bool = False) -> tuple[np.ndarray, list[Scene], list[str]]:
    """n images (uint8 (n, 64, 64, 3)), their scenes and captions, all determined by `seed`."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, held_out) for _ in range(n)]
    captions = [s.caption(rng) for s in scenes]
    images = np.stack([render(s, rng) for s in scenes])
    return images, scenes, captions
