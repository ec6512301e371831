"""Encoding: PNG round-trips exactly and JPEG/WebP closely, on the event loop (small images) and on the pool
(large ones); the spliced JSON body is the one pydantic would write."""
import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from rfserve.server.app import images_json
from rfserve.server.encoding import INLINE_PIXELS, encode_all
from rfserve.server.schemas import ImageData, ImagesResponse
from tests.server.photo import photo_like


@pytest.mark.parametrize("shape", [(8, 8), (64, 64), (80, 80), (257, 513)])
@pytest.mark.parametrize("as_base64", [True, False])
def test_png_round_trips_exactly(shape, as_base64):
    rng = np.random.default_rng(shape[1])
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(3)]
    out = asyncio.run(encode_all(images, as_base64=as_base64))
    assert (shape[0] * shape[1] <= INLINE_PIXELS) == (shape[1] <= 64)
    for img, enc in zip(images, out):
        png = base64.b64decode(enc, validate=True) if as_base64 else enc
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), img)


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
@pytest.mark.parametrize("shape", [(8, 8), (257, 513)])
def test_lossy_formats_decode_close_and_follow_quality(fmt, magic, shape):
    image = photo_like(*shape, seed=1)
    (high,) = asyncio.run(encode_all([image], as_base64=False, fmt=fmt, quality=95))
    (low,) = asyncio.run(encode_all([image], as_base64=False, fmt=fmt, quality=10))
    assert high.startswith(magic) and low.startswith(magic)
    decoded = np.asarray(Image.open(io.BytesIO(high)).convert("RGB")).astype(float)
    assert decoded.shape == image.shape
    assert np.abs(decoded - image).mean() < 6          # mean error in 0-255 levels; 8x8 gradients are steep
    assert len(low) < len(high)


@pytest.mark.parametrize("revised", [None, 'a "quoted" prompt, naïve \\ é'])
def test_spliced_body_equals_pydantic(revised):
    b64 = [base64.b64encode(bytes([i]) * (100 + i)) for i in range(3)]
    envelope = dict(created=5, output_format="jpeg", quality="high", size="64x64", model="m", seed=7,
                    prompt_truncated=revised is not None, timings={"total": 1.5})
    expected = ImagesResponse(data=[ImageData(b64_json=b.decode(), revised_prompt=revised) for b in b64], **envelope)
    body = images_json(ImagesResponse(data=[], **envelope), b64, revised)
    assert json.loads(body) == json.loads(expected.model_dump_json(exclude_none=True))


def test_images_encoded_upstream_are_passed_through():
    """The worker's GPU JPEGs are only base64-encoded; the other images are encoded here."""
    images = [photo_like(80, 80, seed=i) for i in range(2)]
    upstream = b"\xff\xd8\xff from the GPU"
    out = asyncio.run(encode_all(images, as_base64=True, fmt="jpeg", quality=90, encoded=[upstream, None]))
    assert base64.b64decode(out[0]) == upstream
    assert base64.b64decode(out[1])[:3] == b"\xff\xd8\xff" and base64.b64decode(out[1]) != upstream
