"""Field checks the gateway makes against a model card, before anything is queued."""
import pytest

from rfserve.model_zoo.base import ImageDefaults, ModelCard
from rfserve.model_zoo.seeding import MAX_SEED
from rfserve.server.specs import image_specs
from rfserve.server.errors import APIError
from rfserve.server.schemas import ImageGenerationRequest

CARD = ModelCard("m", "janusflow", ImageDefaults(steps=30, guidance=2.0, size="384x384"), sizes=("384x384",),
                 max_steps=50, supports_negative_prompt=False)


def test_defaults_fill_in_and_seeds_count_up():
    specs = image_specs(CARD, "a cat", n=3, seed=10, max_n=4)
    assert [s.seed for s in specs] == [10, 11, 12]
    assert {(s.width, s.height, s.steps, s.guidance) for s in specs} == {(384, 384, 30, 2.0)}


@pytest.mark.parametrize("fields,param", [
    ({"negative_prompt": "blurry"}, "negative_prompt"),
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"size": "512x512"}, "size"),
    ({"size": "384X384"}, "size"),
    ({"steps": 51}, "num_inference_steps"),
    ({"steps": 0}, "num_inference_steps"),
    ({"guidance": 31.0}, "guidance_scale"),
    ({"guidance": -1.0}, "guidance_scale"),
])
def test_out_of_range_fields_are_named(fields, param):
    with pytest.raises(APIError) as err:
        image_specs(CARD, "a cat", max_n=4, **fields)
    assert err.value.status == 400 and err.value.param == param


def test_the_largest_seed_counts_up_past_the_limit():
    """Only the request's seed is bounded; its images may use seeds beyond it."""
    specs = image_specs(CARD, "a cat", n=3, seed=MAX_SEED, max_n=4)
    assert [s.seed for s in specs] == [MAX_SEED, MAX_SEED + 1, MAX_SEED + 2]


@pytest.mark.parametrize("prompt,blank", [("\x1e", False), ("a", False), (" \t\n\u3000\ufeff", True)])
def test_blank_is_what_json_schema_calls_whitespace(prompt, blank):
    """Whitespace as the schema's `pattern` (ECMA-262) has it: Python's `\\s` also takes \\x1e."""
    if blank:
        with pytest.raises(ValueError, match="must not be empty"):
            ImageGenerationRequest(prompt=prompt)
    else:
        assert ImageGenerationRequest(prompt=prompt).prompt == prompt


def test_a_seed_past_the_limit_is_refused():
    with pytest.raises(ValueError, match="seed"):
        ImageGenerationRequest(prompt="a cat", seed=MAX_SEED + 1)


def test_chat_names_its_nested_fields():
    with pytest.raises(APIError) as err:
        image_specs(CARD, "a cat", max_n=1, size="1x1", prefix="image.")
    assert err.value.param == "image.size" and err.value.message.startswith("image.size '1x1'")
