"""`POST /v1/images/edits`: OpenAI's multipart fields → edit specs, every file checked before anything queues.

- `image`: one file (also accepted as a one-element `image[]` list, as the `openai` client sends a list). The
  flow edits one picture; more are refused with a 400 naming `image`.
- `mask`: optional, a PNG of the image's size with an alpha channel. Where it is transparent (alpha < 128)
  the picture may change; elsewhere the input is kept.
- The text fields are `ImageEditRequest`'s, parsed from form text. The input is resized to `size` (the
  model's default when left out), with Lanczos as diffusers' image processor resizes.
A body over `--max-body-bytes` was already refused with 413 by `server.limits`.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from rfserve.model_zoo.base import ImageSpec, ModelCard
from rfserve.server.config import ServerConfig
from rfserve.server.errors import APIError, Code
from rfserve.server.schemas import ImageEditRequest
from rfserve.server.specs import image_specs
from rfserve.server.uploads import open_image

IMAGE_FIELDS = ("image", "image[]")
FILE_FIELDS = (*IMAGE_FIELDS, "mask")
MAX_IMAGES = 1
ALPHA_MODES = ("RGBA", "LA", "PA")


def _schema_with_files() -> dict:
    """The multipart body as the OpenAPI document shows it: the text fields plus the two files."""
    schema = ImageEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "the picture to edit (PNG, JPEG or WebP)"},
        "mask": {"type": "string", "format": "binary",
                 "description": "PNG with alpha, the image's size: transparent pixels mark the area to change"},
        **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    # The stream-makes-one-image rule stays in words (`stream`'s description): schemathesis cannot yet
    # generate multipart bodies from an if/then over binary fields.
    schema.pop("if"), schema.pop("then")
    return schema


OPENAPI_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _schema_with_files()}}}}


async def read_edit(request: Request, config: ServerConfig) -> tuple[ImageEditRequest, Image.Image, np.ndarray | None]:
    """The fields, the RGB image and, when a mask was sent, where it lets the picture change ((H, W) bool)."""
    form = await request.form(max_files=len(FILE_FIELDS) + 1, max_fields=64, max_part_size=config.max_body_bytes)
    files: dict[str, list[UploadFile]] = {}
    texts: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            if not isinstance(value, UploadFile):
                raise APIError(Code.INVALID_VALUE, f"{key} must be sent as a file", param=key.removesuffix("[]"))
            files.setdefault(key.removesuffix("[]"), []).append(value)
        elif isinstance(value, UploadFile):
            raise APIError(Code.INVALID_VALUE, f"{key} must be a text field, not a file", param=key)
        elif key in texts:
            raise APIError(Code.INVALID_VALUE, f"{key} is given twice", param=key)
        else:
            texts[key] = value
    images, masks = files.get("image", []), files.get("mask", [])
    if not images:
        raise APIError(Code.MISSING_REQUIRED_PARAMETER, "missing required field: image (send the picture to edit "
                                                        "as a file)", param="image")
    if len(images) > MAX_IMAGES:
        raise APIError(Code.INVALID_VALUE, f"image: at most {MAX_IMAGES} image per edit, got {len(images)}",
                       param="image")
    if len(masks) > 1:
        raise APIError(Code.INVALID_VALUE, "mask: send at most one mask", param="mask")
    try:
        body = ImageEditRequest.model_validate(texts)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None
    limits = {"max_bytes": config.max_body_bytes, "max_pixels": config.max_input_pixels}
    image = await asyncio.to_thread(open_image, await images[0].read(), "image", **limits)
    if not masks:
        return body, image.convert("RGB"), None
    mask = await asyncio.to_thread(open_image, await masks[0].read(), "mask", **limits)
    if mask.size != image.size:
        raise APIError(Code.INVALID_IMAGE, f"mask: its size {mask.width}x{mask.height} differs from the image's "
                                           f"{image.width}x{image.height}", param="mask")
    if mask.mode not in ALPHA_MODES and "transparency" not in mask.info:
        raise APIError(Code.INVALID_IMAGE, f"mask: it has no alpha channel (mode {mask.mode}); send a PNG whose "
                                           "transparent pixels mark the area to change", param="mask")
    return body, image.convert("RGB"), np.asarray(mask.convert("RGBA"))[..., 3] < 128


def edit_specs(card: ModelCard, body: ImageEditRequest, image: Image.Image, change: np.ndarray | None,
               max_n: int) -> list[ImageSpec]:
    """The request's specs (validated as generations' are), each carrying the resized input and mask."""
    if not card.supports_edits:
        raise APIError(Code.UNSUPPORTED_MODEL, f"model {card.name!r} ({card.family}) does not edit images",
                       param="model")
    specs = image_specs(card, body.prompt, max_n=max_n, n=body.n, size=body.size, steps=body.num_inference_steps,
                        guidance=body.guidance_scale, seed=body.seed, negative_prompt=body.negative_prompt,
                        quality=body.quality)
    size = (specs[0].width, specs[0].height)
    pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image)      # (H, W, 3)
    mask = None
    if change is not None:
        resized = Image.fromarray(change).resize(size, Image.Resampling.NEAREST) if image.size != size else change
        mask = np.asarray(resized, dtype=np.float32)                                              # (H, W)
    return [replace(s, strength=body.strength, image=pixels, mask=mask) for s in specs]
