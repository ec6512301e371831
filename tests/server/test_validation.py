"""Field checks the gateway makes against a model card, before anything is queued."""
import pytest

from model_zoo.base import ImageDefaults, ModelCard
from server.app import _specs
from server.errors import APIError
from server.schemas import ImageGenerationRequest

CARD = ModelCard("m", "janusflow", ImageDefaults(steps=30, guidance=2.0, size="384x384"), sizes=("384x384",),
                 max_steps=50, supports_negative_prompt=False)


def test_defaults_fill_in_and_seeds_count_up():
    specs = _specs(ImageGenerationRequest(prompt="a cat", n=3, seed=10), CARD, max_n=4)
    assert [s.seed for s in specs] == [10, 11, 12]
    assert {(s.width, s.height, s.steps, s.guidance) for s in specs} == {(384, 384, 30, 2.0)}


@pytest.mark.parametrize("fields,param", [
    ({"negative_prompt": "blurry"}, "negative_prompt"),
    ({"n": 5}, "n"),
    ({"size": "512x512"}, "size"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"guidance_scale": 31.0}, "guidance_scale"),
    ({"seed": 2**63 - 2, "n": 3}, "seed"),
])
def test_out_of_range_fields_are_named(fields, param):
    with pytest.raises(APIError) as err:
        _specs(ImageGenerationRequest(prompt="a cat", **fields), CARD, max_n=4)
    assert err.value.status == 400 and err.value.param == param
