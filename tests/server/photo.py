"""Test images that compress like photographs."""
import numpy as np


def photo_like(h: int, w: int, seed: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    """(*batch, h, w, 3) uint8: smooth gradients plus mild noise, what lossy codecs are built for, unlike pure
    noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 4, (*batch, h, w, 3)), 0, 255).astype(np.uint8)
