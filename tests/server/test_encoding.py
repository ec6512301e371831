"""PNG encoding round-trips exactly, on the event loop (small images) and on the pool (large ones)."""
import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from server.encoding import INLINE_PIXELS, encode_all


@pytest.mark.parametrize("side", [16, 64, 80])
@pytest.mark.parametrize("as_base64", [True, False])
def test_encode_all_round_trips(side, as_base64):
    rng = np.random.default_rng(side)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(3)]
    out = asyncio.run(encode_all(images, as_base64=as_base64))
    assert (side * side <= INLINE_PIXELS) == (side <= 64)
    for img, enc in zip(images, out):
        png = base64.b64decode(enc) if as_base64 else enc
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), img)
