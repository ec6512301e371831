"""Request and response bodies of the OpenAI Chat Completions API, with one extension:
`modalities: ["image"]` asks for an image made from the last user message (JanusFlow t2i)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from rfserve.model_zoo.seeding import MAX_SEED
from rfserve.server.ranges import Range
from rfserve.server.schemas import whole_numbers


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ImageOptions(BaseModel):
    """Extension: settings for `modalities: ["image"]`."""
    model_config = ConfigDict(extra="forbid", strict=True)
    size: str | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: Annotated[float, Range(0.0, later=True)] | None = None     # the model's limit: server/specs.py
    partial_images: int = Field(2, ge=0, le=3, description=(
        "with `stream`, previews sent as image chunks (`partial_image_index` set) before the image"))

    _whole = whole_numbers("num_inference_steps", "partial_images")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: Annotated[float, Range(0.0, 2.0)] = 1.0
    top_p: Annotated[float, Range(0.0, 1.0, above=True)] = 1.0
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)
    # extension
    modalities: list[Literal["text", "image"]] | None = None
    image: ImageOptions | None = None

    _whole = whole_numbers("max_tokens", "max_completion_tokens", "seed", "n")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ImageContent(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL
    partial_image_index: int | None = None      # set on a streamed preview; the image itself has none


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | list[ImageContent]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    seed: int | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | list[ImageContent] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
