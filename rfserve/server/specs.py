"""A request's image fields → `ImageSpec`s: the model card's defaults filled in and every field checked
against its limits. The images route, chat's image answers and `rfserve generate` all build through it,
so a field means the same thing, and is refused with the same words, wherever it is given."""
from __future__ import annotations

from rfserve.model_zoo.base import ImageSpec, ModelCard, parse_size
from rfserve.model_zoo.seeding import random_seed
from rfserve.server.errors import APIError, Code
from rfserve.server.ranges import range_error


# OpenAI's `quality` as a share of a multi-step model's default step count.
QUALITY_STEPS = {"low": 0.5, "high": 1.5, "hd": 1.5}


def quality_steps(card: ModelCard, quality: str) -> int:
    """The step count `quality` picks when a request names none; one-step models stay at one."""
    d = card.defaults
    if d.steps == 1:
        return 1
    return max(1, min(card.max_steps, round(d.steps * QUALITY_STEPS.get(quality, 1.0))))


def image_specs(card: ModelCard, prompt: str, *, max_n: int, n: int = 1, size: str | None = None,
                steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                negative_prompt: str | None = None, quality: str = "auto", prefix: str = "") -> list[ImageSpec]:
    """`prefix` is where the fields sit in the request body (chat nests them under "image.")."""
    d = card.defaults
    if not 1 <= n <= max_n:
        raise APIError(Code.INVALID_VALUE, f"n must be between 1 and {max_n}", param="n")
    size = d.size if size is None else size
    if size not in card.sizes:
        raise APIError(Code.INVALID_VALUE, f"{prefix}size {size!r} is not supported by {card.name}; "
                                           f"allowed: {list(card.sizes)}", param=f"{prefix}size")
    steps = quality_steps(card, quality) if steps is None else steps
    if not 1 <= steps <= card.max_steps:
        raise APIError(Code.INVALID_VALUE, f"{prefix}num_inference_steps must be between 1 and {card.max_steps}",
                       param=f"{prefix}num_inference_steps")
    guidance = d.guidance if guidance is None else guidance
    why = range_error(guidance, 0, card.max_guidance)
    if why is not None:
        raise APIError(Code.INVALID_VALUE, f"{prefix}guidance_scale: {why}", param=f"{prefix}guidance_scale")
    if negative_prompt is not None and not card.supports_negative_prompt:
        raise APIError(Code.INVALID_VALUE, f"{card.name} does not take a negative_prompt", param="negative_prompt")
    negative = d.negative_prompt if negative_prompt is None else negative_prompt
    seed = random_seed() if seed is None else seed
    width, height = parse_size(size)
    return [ImageSpec(prompt, negative, seed + i, width, height, steps, guidance) for i in range(n)]
