"""Geometric checker: reads colour, shape kind, count and background off a shapes image.

Pixels are labelled with their nearest palette colour; the background is the border's
majority label and the shape colour the majority among confidently-labelled other pixels.
Each connected blob of that colour is matched against ideal circle/square/triangle masks
drawn in its bounding box (best IoU wins), which tolerates the soft edges of generated images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .data import COLOURS, PALETTE, SHAPES, Scene

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (K, 3)
CONFIDENT_DIST = 70.0  # RGB distance under which a pixel counts as "that palette colour"
MIN_BLOB_AREA = 8  # pixels; smaller blobs are edge noise
MIN_BLOB_FRACTION = 0.2  # of the largest blob; smaller ones are fragments
FEATURE_DIM = 16  # colours 6, blob counts/areas 3, shape IoUs 3, centre 2, coverage 2


@dataclass(frozen=True)
class Reading:
    """What the checker saw in one image, plus the measurements the Fréchet features use."""
    colour: str | None
    shape: str | None  # the majority kind among blobs
    shapes: tuple[str, ...]  # per-blob kinds
    count: int
    background: str
    features: np.ndarray  # (FEATURE_DIM,)

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "colour": self.colour == scene.colour,
            "shape": self.count > 0 and all(s == scene.shape for s in self.shapes),
            "count": self.count == scene.count,
            "background": self.background == scene.background,
        }


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal masks of each shape kind filling an h x w box."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xs + 0.5) / w, (ys + 0.5) / h  # in (0, 1)
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def _classify_blob(blob: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-IoU shape kind of a cropped boolean blob, and all IoUs."""
    ious = {}
    for name, tmpl in _templates(*blob.shape).items():
        ious[name] = float((blob & tmpl).sum() / max((blob | tmpl).sum(), 1))
    return max(ious, key=ious.get), ious


def label_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index and its RGB distance per pixel: (H, W) int, (H, W) float."""
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE_RGB, axis=-1)  # (H, W, K)
    return dist.argmin(-1), dist.min(-1)



def read(image: np.ndarray, min_fraction: float = MIN_BLOB_FRACTION) -> Reading:
    """Checker reading of one uint8 (H, W, 3) image. With `min_fraction` 0 no blob is dropped as a fragment, which
    counts as a reader does: a small third circle is still a circle."""
    labels, dist = label_pixels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    candidates = (labels != bg) & (dist < CONFIDENT_DIST)
    fg = int(np.bincount(labels[candidates], minlength=len(COLOURS)).argmax()) if candidates.any() else None

    blobs: list[np.ndarray] = []
    if fg is not None:
        mask = ndimage.binary_fill_holes(candidates & (labels == fg))
        comp, n = ndimage.label(mask)
        areas = ndimage.sum(mask, comp, index=range(1, n + 1))
        keep_min = max(MIN_BLOB_AREA, min_fraction * max(areas, default=0))
        for index, (sl, area) in enumerate(zip(ndimage.find_objects(comp), areas), start=1):
            if area >= keep_min:
                blobs.append((sl, comp[sl] == index))
    kinds, ious, areas, centres = [], [], [], []
    for sl, blob in blobs:
        kind, iou = _classify_blob(blob)
        kinds.append(kind)
        ious.append([iou[s] for s in SHAPES])
        areas.append(blob.sum())
        centres.append([(sl[1].start + sl[1].stop) / 2, (sl[0].start + sl[0].stop) / 2])
    shape = max(set(kinds), key=kinds.count) if kinds else None

    bg_mask = labels == bg
    fg_mask = np.zeros_like(bg_mask) if fg is None else (labels == fg)
    pixels = image.reshape(-1, 3).astype(np.float32)
    mean_rgb = lambda m: pixels[m.ravel()].mean(0) / 255 if m.any() else np.zeros(3)  # noqa: E731
    features = np.concatenate([
        mean_rgb(bg_mask), mean_rgb(fg_mask),  # 6
        [len(blobs), np.mean(areas) / 256 if areas else 0, np.std(areas) / 256 if areas else 0],  # 3
        np.mean(ious, axis=0) if ious else np.zeros(3),  # 3
        np.mean(centres, axis=0) / 64 if centres else np.zeros(2),  # 2
        [fg_mask.mean(), 1.0 - (bg_mask | fg_mask).mean()],  # 2: shape coverage, stray-colour coverage
    ]).astype(np.float64)
    return Reading(None if fg is None else COLOURS[fg], shape, tuple(kinds), len(blobs), COLOURS[bg], features)


def check(images: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy of `images` (uint8 (B, H, W, 3)) against the scenes they should show."""
    hits = [read(img).matches(s) for img, s in zip(images, scenes)]
    out = {k: float(np.mean([h[k] for h in hits])) for k in hits[0]}
    out["all"] = float(np.mean([all(h.values()) for h in hits]))
    return out
