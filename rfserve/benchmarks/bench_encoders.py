"""Image encoders, measured side by side: the evidence behind `server/encoding.py`'s choices.

    python -m rfserve.benchmarks.bench_encoders [--sizes 512,1024] [--out results/encoders.json]

For every candidate installed (PIL, fpng, OpenCV, simplejpeg, imagecodecs) and each format, on crops of a
real photograph (the synthetic model's images, which compress like a model's output):
- milliseconds per image on one thread, and the output size;
- images per second on every usable core, through one thread pool: a codec that holds the GIL gains nothing
  from the second thread, which is what decides between a thread pool and a process pool;
- for PNG, that the file decodes back to exactly the input;
- base64 of the PNG, which every `b64_json` answer pays.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from rfserve.benchmarks.loadgen import environment
from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.registry import parse_spec
from rfserve.model_zoo.synthetic import load_synthetic
from rfserve.server.threads import usable_cores

Encoder = Callable[[np.ndarray], bytes]
QUALITY = 90


def _pil(fmt: str, **options) -> Encoder:
    def encode(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, **options)
        return buf.getvalue()
    return encode


def candidates() -> dict[str, dict[str, Encoder]]:
    """{format: {name: encoder}} for every library that imports here."""
    found: dict[str, dict[str, Encoder]] = {
        "png": {"PIL level 1": _pil("PNG", compress_level=1), "PIL level 0": _pil("PNG", compress_level=0)},
        "jpeg": {"PIL": _pil("JPEG", quality=QUALITY)},
        "webp": {"PIL method 0": _pil("WEBP", quality=QUALITY, method=0)},
    }
    try:
        import fpng
        found["png"]["fpng"] = fpng.from_ndarray
    except ImportError:
        pass
    try:
        import cv2

        def cv(ext: str, *params: int) -> Encoder:
            # OpenCV wants BGR; the channel swap is part of its cost here
            return lambda image: cv2.imencode(ext, image[..., ::-1], list(params))[1].tobytes()
        found["png"]["OpenCV level 1"] = cv(".png", cv2.IMWRITE_PNG_COMPRESSION, 1)
        found["jpeg"]["OpenCV"] = cv(".jpg", cv2.IMWRITE_JPEG_QUALITY, QUALITY)
        found["webp"]["OpenCV"] = cv(".webp", cv2.IMWRITE_WEBP_QUALITY, QUALITY)
    except ImportError:
        pass
    try:
        import simplejpeg
        found["jpeg"]["simplejpeg 4:2:0"] = lambda image: simplejpeg.encode_jpeg(
            image, quality=QUALITY, colorspace="RGB", colorsubsampling="420")
    except ImportError:
        pass
    try:
        import imagecodecs
        found["png"]["imagecodecs spng level 1"] = lambda image: imagecodecs.spng_encode(image, level=1)
        found["jpeg"]["imagecodecs jpeg8"] = lambda image: imagecodecs.jpeg8_encode(image, level=QUALITY)
        found["webp"]["imagecodecs webp"] = lambda image: imagecodecs.webp_encode(image, level=QUALITY, method=0)
    except ImportError:
        pass
    return found


def base64_candidates() -> dict[str, Callable[[bytes], bytes]]:
    found = {"base64 (standard library)": base64.b64encode}
    try:
        import pybase64
        found["pybase64"] = pybase64.b64encode
    except ImportError:
        pass
    return found


def measure(encode: Callable, images: list, seconds: float, threads: int) -> dict:
    encode(images[0])                                                       # warm: first-call setup is not cost
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        encode(images[n % len(images)])
        n += 1
    one_ms = (time.perf_counter() - start) * 1000 / n
    batch = [images[i % len(images)] for i in range(max(4 * threads, min(n, 2000)))]      # outputs stay bounded
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for _ in pool.map(encode, batch):
            pass
        pooled = len(batch) / (time.perf_counter() - start)
    return {"ms_per_image": round(one_ms, 2), "kb": round(len(encode(images[0])) / 1024, 1),
            "pooled_img_s": round(pooled, 1), "single_img_s": round(1000 / one_ms, 1)}


def lossless(encode: Encoder, image: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(Image.open(io.BytesIO(encode(image))).convert("RGB")), image))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--seconds", type=float, default=1.5, help="single-thread timing per candidate")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    threads = usable_cores()
    pipe = load_synthetic(parse_spec("synthetic"), None, "cpu", None).pipeline
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        images = [pipe.image(ImageSpec("", "", s, side, side, 1, 0.0)) for s in range(4)]
        for fmt, encoders in candidates().items():
            for name, encode in encoders.items():
                row = {"size": side, "format": fmt, "encoder": name, **measure(encode, images, args.seconds, threads)}
                if fmt == "png":
                    row["lossless"] = lossless(encode, images[0])
                rows.append(row)
                print(json.dumps(row), flush=True)
        pngs = [candidates()["png"]["PIL level 1"](image) for image in images]        # what base64 is given
        for name, b64 in base64_candidates().items():
            row = {"size": side, "format": "base64 of PNG", "encoder": name,
                   **measure(b64, pngs, args.seconds, threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"env": environment(), "threads": threads, "quality": QUALITY, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"\n| size | format | encoder | ms/image (1 thread) | img/s ({threads} threads) | KB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        flag = "" if r.get("lossless", True) else " (NOT lossless)"
        print(f"| {r['size']}² | {r['format']} | {r['encoder']}{flag} | {r['ms_per_image']} | {r['pooled_img_s']} | "
              f"{r['kb']} |")


if __name__ == "__main__":
    main()
