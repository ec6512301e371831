"""JPEG encoded on the GPU (torchvision's nvJPEG) decodes to the same pixels as the CPU encoder's, within JPEG
tolerance; the worker uses it for a batch decoded on CUDA, and a CPU batch never goes near it."""
import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from rfserve.server.encoding import device_jpeg, encode_all
from tests.server.photo import photo_like


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)


def test_cpu_pixels_never_take_the_gpu_path():
    assert device_jpeg(None, {0: 90}) == {}
    assert device_jpeg(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), {0: 90}) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("side", [64, 512])
def test_gpu_jpeg_decodes_like_the_cpu_encoder(side):
    host = photo_like(side, side, seed=0, batch=(3,))
    pixels = torch.from_numpy(host).cuda()
    qualities = {0: 90, 2: 50}                            # row 1 asked for another format: left alone
    gpu = device_jpeg(pixels, qualities)
    assert sorted(gpu) == [0, 2]
    for row, quality in qualities.items():
        assert gpu[row][:3] == b"\xff\xd8\xff"
        (cpu,) = asyncio.run(encode_all([host[row]], as_base64=False, fmt="jpeg", quality=quality))
        from_gpu, from_cpu = _pixels(gpu[row]), _pixels(cpu)
        assert from_gpu.shape == host[row].shape
        assert np.abs(from_gpu - host[row]).mean() < (3 if quality == 90 else 6)
        assert np.abs(from_gpu - from_cpu).mean() < 2


@pytest.mark.gpu
@pytest.mark.slow
def test_server_answers_gpu_encoded_jpeg(tiny_sd):
    import httpx

    from tests.server.serving import ServerProcess

    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--device", "cuda")
    try:
        body = {"prompt": "p", "size": "64x64", "seed": 3, "n": 2}
        png = httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=120).json()
        jpeg = httpx.post(f"{srv.url}/v1/images/generations", json={**body, "output_format": "jpeg",
                                                                     "output_compression": 95}, timeout=120).json()
        assert jpeg["output_format"] == "jpeg"
        assert "gpu_jpeg" in jpeg["timings"] and "gpu_jpeg" not in png["timings"]     # encoded by the worker
        for p, j in zip(png["data"], jpeg["data"]):
            exact = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["b64_json"])))).astype(np.float64)
            assert np.abs(_pixels(base64.b64decode(j["b64_json"])) - exact).mean() < 4
    finally:
        srv.stop()
