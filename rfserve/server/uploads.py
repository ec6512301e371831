"""Images that clients send (chat's image parts, the edit route's image and mask): bytes → a PIL image, with
the byte size and the pixel count checked from the header before any pixel is decoded, so a decompression
bomb costs nothing. Every refusal is a 400 that names the field."""
from __future__ import annotations

import io
import warnings

from PIL import Image

from rfserve.server.errors import APIError, Code


def open_image(raw: bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """The decoded image in its own mode (an edit's mask keeps its alpha channel)."""
    if len(raw) > max_bytes:
        raise APIError(Code.INVALID_IMAGE, f"{field}: image too large ({len(raw)} bytes, at most {max_bytes})",
                       param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > max_pixels:
                raise APIError(Code.INVALID_IMAGE, f"{field}: image too large ({w}x{h} pixels, at most "
                                                   f"{max_pixels})", param=field)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(Code.INVALID_IMAGE, f"{field}: image too large (decompression bomb guard)",
                       param=field) from None
    except (OSError, SyntaxError, ValueError):
        raise APIError(Code.INVALID_IMAGE, f"{field}: the image cannot be decoded", param=field) from None
    if img.width < 1 or img.height < 1:
        raise APIError(Code.INVALID_IMAGE, f"{field}: the image is empty", param=field)
    return img
