"""PNG, JPEG and WebP encoding (and base64), run on a thread pool so the event loop never blocks."""
from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rfserve-png")
# Up to 64x64 an image encodes on the event loop in at most about 0.25 ms, which costs less than the thread
# and GIL hand-offs (with the worker too) of a trip through the pool.
INLINE_PIXELS = 64 * 64


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def image_bytes(image: np.ndarray, fmt: str = "png", quality: int = 100) -> bytes:
    """`quality` (OpenAI's `output_compression`) sets JPEG and WebP quality; PNG stays lossless at zlib
    level 1, the fastest level that still compresses."""
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="WEBP", quality=quality, method=0)     # method 0: the fastest encoder effort
    return buf.getvalue()


def _encode(image: np.ndarray, fmt: str, quality: int, as_base64: bool) -> bytes | str:
    data = image_bytes(image, fmt, quality)
    return base64.b64encode(data).decode("ascii") if as_base64 else data


async def encode_all(images: list[np.ndarray], as_base64: bool, fmt: str = "png", quality: int = 100) -> list:
    if all(img.shape[0] * img.shape[1] <= INLINE_PIXELS for img in images):
        return [_encode(img, fmt, quality, as_base64) for img in images]
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(_POOL, _encode, img, fmt, quality, as_base64)
                                  for img in images))
