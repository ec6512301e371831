"""Request and response bodies of the OpenAI Images API, with our extensions."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_zoo.seeding import MAX_SEED


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=20_000)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    # extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=20_000)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0)
    timeout: float | None = Field(None, gt=0.0, description="seconds; capped by the server")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    seed: int
    prompt_truncated: bool = False
    timings: dict[str, float] = {}    # milliseconds per stage: queue, encode, sample, decode, total


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
