"""Request and response bodies of the OpenAI Images API, with our extensions."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from rfserve.model_zoo.seeding import MAX_SEED
from rfserve.server.ranges import Range

# A prompt needs one character that is not whitespace. The schema publishes the same expression the
# validator runs, so a client's schema check and the server never disagree: whitespace spelled out as
# JSON Schema's (ECMA-262) `\s` has it, since Python's `\s` also takes \x1c-\x1f and \x85.
NON_BLANK = r"[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]


def whole_numbers(*fields: str):
    """A validator for a strict model's integer fields: JSON Schema counts 39.0 as an integer, so the
    server does too, while strings and bools stay refused."""
    def whole(cls, value):
        return int(value) if isinstance(value, float) and value.is_integer() else value
    return field_validator(*fields, mode="before")(whole)


LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"     # server.adapters.NAME


class LoraChoice(BaseModel):
    """One adapter of a request's `lora`, at its scale (diffusers' `set_adapters` weight)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)
    scale: Annotated[float, Range(-4.0, 4.0)] = 1.0


def _lora_list(value):
    """A bare name means that adapter at scale 1. A multipart edit's fields are text, so there the list comes as
    JSON text (a name never starts with '[')."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("not a name, and not a JSON list of {name, scale} objects") from None
        return [{"name": value}]
    return value


LoraField = Annotated[list[LoraChoice], BeforeValidator(_lora_list), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": LORA_NAME},
              {"type": "array", "items": LoraChoice.model_json_schema()}],
    "description": "LoRA adapters loaded on the server (GET /v1/loras): a name, or a list of {name, scale} (empty: "
                   "none); several combine as diffusers' set_adapters does. Rows with different adapters share a "
                   "batch."})]


class ImageOptions(BaseModel):
    """The fields generations and edits share: the model, the count, the output, streaming, our extensions."""
    # Streamed events carry no image index, so a stream makes one image (a 400 naming `n` otherwise).
    model_config = ConfigDict(json_schema_extra={"if": {"properties": {"stream": {"const": True}},
                                                        "required": ["stream"]},
                                                 "then": {"properties": {"n": {"const": 1}}}})
    model: str | None = Field(None, description="a served model; the first one when left out")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WxH, one of the model's sizes; the model's default when left out")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100, description=(
        "JPEG and WebP quality, 0-100. PNG is lossless and ignores it."))
    background: Literal["auto", "opaque"] = Field("auto", description=(
        "the models make opaque images; `transparent` is refused with a 400"))
    quality: Quality = Field("auto", description=(
        "for multi-step models, the step count when `num_inference_steps` is not given: low = half the default, "
        "high and hd = 1.5 times it (up to the model's maximum), auto, medium and standard = the default; "
        "one-step models take it and change nothing"))
    stream: bool = Field(False, description=(
        "server-sent events: `partial_images` previews, then the image (n must be 1); `response_format` "
        "does not apply, every event carries base64"))
    partial_images: int = Field(0, ge=0, le=3, description=(
        "previews to stream, evenly spaced over the steps, taken from the flow's estimate of the finished "
        "image; a one-step model sends none, and a short run may send fewer"))
    user: str | None = Field(None, max_length=256)
    # extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; random when left out")
    negative_prompt: str | None = Field(None, max_length=20_000)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: Annotated[float, Range(0.0, later=True)] | None = None     # the model's limit: server/specs.py
    timeout: Annotated[float, Range(0.0, above=True, later=True)] | None = Field(
        None, description="seconds; capped by the server")
    lora: LoraField | None = None

    @field_validator("background", mode="before")
    @classmethod
    def _opaque_only(cls, v):
        if v == "transparent":
            raise ValueError("transparent backgrounds are not supported: every model here makes opaque images; "
                             "use auto or opaque")
        return v

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not re.search(NON_BLANK, v):
            raise ValueError("must not be empty")
        return v


class ImageGenerationRequest(ImageOptions):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=20_000, json_schema_extra={"pattern": NON_BLANK})

    _whole = whole_numbers("n", "seed", "num_inference_steps", "output_compression", "partial_images")


class ImageEditRequest(ImageOptions):
    """The text fields of a multipart edit (the files are checked apart, in server/edits.py). Form fields
    arrive as text, so numbers and booleans are parsed from it."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=20_000, json_schema_extra={"pattern": NON_BLANK})
    strength: Annotated[float, Range(0.0, 1.0)] = Field(0.8, description=(
        "the share of the flow run from the input: near 0 returns the input, 1 ignores it (text-to-image)"))


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    quality: Quality
    size: str
    background: Literal["opaque"] = "opaque"
    model: str
    seed: int
    prompt_truncated: bool = False
    timings: dict[str, float] = {}    # ms per stage: queue, encode, sample, decode, gpu_jpeg (on CUDA), total
    warnings: list[str] | None = Field(None, description=(
        "present when the prompt uses words outside the model's `vocabulary` (see /v1/models): they are named, "
        "and the picture does not follow them"))


class VocabularyObject(BaseModel):
    """The words a model trained on a closed caption grammar knows (the embedded rf-shapes models)."""
    colours: list[str]
    shapes: list[str] = Field(description="singular; a caption adds s for more than one")
    counts: list[str]
    backgrounds: list[str] = Field(description="colours a background may have (never the shapes' own)")
    examples: list[str] = Field(description="whole prompts in the grammar of the captions it was trained on")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rfserve"
    family: str
    sizes: list[str]
    default_size: str
    default_steps: int
    default_guidance_scale: float
    max_steps: int
    edits: bool = Field(description="whether /v1/images/edits takes this model")
    chat: bool = Field(description="whether /v1/chat/completions takes this model")
    vocabulary: VocabularyObject | None = Field(description=(
        "the words the model knows; null for a model that takes free text"))


    loras: list[str] | None = Field(None, description=(
        "the LoRA adapters loaded for this model (GET /v1/loras); null where the model serves none"))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class LoraLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(json_schema_extra={"pattern": LORA_NAME}, description="what requests call it by")
    path: str = Field(min_length=1, max_length=4096, description=(
        "a .safetensors file (diffusers/peft or kohya/A1111 keys), a folder holding one, or a hub id; under "
        "--model-root when the server has one"))
    model: str | None = Field(None, description="the model it is for; the first served model that takes LoRA "
                                                "when left out")


class LoraObject(BaseModel):
    id: str
    object: Literal["lora"] = "lora"
    model: str
    source: str
    rank: int
    components: list[str] = Field(description="unet, text_encoder and/or transformer: the parts it changes")
    created: int


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraObject]


class LoraDeleted(BaseModel):
    id: str
    object: Literal["lora"] = "lora"
    deleted: Literal[True] = Field(True, description=(
        "new requests are refused it at once; it leaves the device after the last request that uses it"))


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining"]
    models: list[str] | None = None
