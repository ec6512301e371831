"""PNG and base64 encoding, run on a thread pool so the event loop never blocks."""
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


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64_png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


async def encode_all(images: list[np.ndarray], as_base64: bool) -> list:
    fn = b64_png if as_base64 else png_bytes
    if all(img.shape[0] * img.shape[1] <= INLINE_PIXELS for img in images):
        return [fn(img) for img in images]
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(_POOL, fn, img) for img in images))
