"""PNG, JPEG and WebP encoding and base64, on a thread pool so the event loop never blocks.

Each format uses the fastest encoder measured by `benchmarks/bench_encoders.py` (figures in
benchmarks/RESULTS.md; 512² photograph, one thread of a 2-core x86-64):
- PNG: fpng, 1.35 ms against PIL's 16.7 ms at zlib level 1, a valid lossless PNG about 15% larger. It holds the
  GIL, but a process pool was no better: the parent spent 0.86 ms an image moving pixels and bytes through
  pipes, as much as the encode itself.
- JPEG: simplejpeg (libjpeg-turbo) at 4:2:0, PIL's default subsampling: 0.68 ms, and it releases the GIL, so
  two threads gave 2781 images/s where PIL, which holds it, gave 1095.
- WebP: PIL at method 0, 7.6 ms, releasing the GIL; OpenCV's and imagecodecs' were three to five times slower.
- base64: pybase64's SIMD codec, 0.01 ms for a 541 KB base64 PNG against 0.38 ms for the standard library's.
On CUDA, the worker encodes a batch's JPEG rows on the GPU before they leave it (`device_jpeg`).
"""
from __future__ import annotations

import asyncio
import functools
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import fpng
import numpy as np
import pybase64
import simplejpeg
from PIL import Image

from rfserve.server.threads import usable_cores

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rfserve.encoding")

# Every usable core: the codecs that release the GIL scale across them, and fpng's turns only interleave.
_POOL = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="rfserve-encode")
# Up to 64x64 an image encodes on the event loop in well under 0.1 ms, less than the thread and GIL
# hand-offs (with the worker too) of a trip through the pool.
INLINE_PIXELS = 64 * 64

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def image_bytes(image: np.ndarray, fmt: str = "png", quality: int = 100) -> bytes:
    """`image`: (H, W, 3) uint8. `quality` (OpenAI's `output_compression`) is the JPEG and WebP quality;
    PNG is lossless and ignores it."""
    if fmt == "png":
        return fpng.from_ndarray(np.ascontiguousarray(image))
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=max(1, quality), colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="WEBP", quality=quality, method=0)  # method 0: the fastest effort
    return buf.getvalue()


@functools.cache
def _gpu_encoder() -> Callable | None:
    """torchvision's nvJPEG `encode_jpeg` (about 0.19 ms an image against 2.2 ms on a CPU thread, torchvision
    PR #8391), imported on first use so that CPU servers never load torchvision; None where it is absent."""
    try:
        from torchvision.io import encode_jpeg
    except ImportError:
        log.info("torchvision is not installed: JPEG is encoded on the CPU")
        return None
    return encode_jpeg


def device_jpeg(pixels: torch.Tensor | None, qualities: dict[int, int]) -> dict[int, bytes]:
    """JPEGs of rows of a batch still on the GPU (`pixels`: (B, H, W, 3) uint8), {row: quality} -> {row: bytes},
    one batched call per quality. Empty where the pixels are not on CUDA, torchvision is absent or its encoder
    fails: the CPU encoder then takes those images, so a JPEG answer never depends on this path."""
    if pixels is None or not pixels.is_cuda or not qualities:
        return {}
    encode = _gpu_encoder()
    if encode is None:
        return {}
    out: dict[int, bytes] = {}
    try:
        for quality in set(qualities.values()):
            rows = [k for k, q in qualities.items() if q == quality]
            chw = [pixels[k].permute(2, 0, 1).contiguous() for k in rows]              # (3, H, W) each
            for k, data in zip(rows, encode(chw, quality=max(1, quality))):
                out[k] = data.cpu().numpy().tobytes()
    except RuntimeError:
        log.exception("GPU JPEG encoding failed; these images go to the CPU encoder")
        return {}
    return out


def _encode(image: np.ndarray, fmt: str, quality: int, as_base64: bool, encoded: bytes | None) -> bytes:
    data = image_bytes(image, fmt, quality) if encoded is None else encoded
    return pybase64.b64encode(data) if as_base64 else data


async def encode_all(images: list[np.ndarray], as_base64: bool, fmt: str = "png", quality: int = 100,
                     encoded: list[bytes | None] | None = None) -> list[bytes]:
    """The encoded images, or their base64 as ASCII bytes: `images_json` splices those into a body as they are.
    `encoded` holds the images already encoded (on the GPU), which are only base64-encoded here."""
    ready = encoded or [None] * len(images)
    if all(img.shape[0] * img.shape[1] <= INLINE_PIXELS or done is not None for img, done in zip(images, ready)):
        return [_encode(img, fmt, quality, as_base64, done) for img, done in zip(images, ready)]
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(_POOL, _encode, img, fmt, quality, as_base64, done)
                                  for img, done in zip(images, ready)))
