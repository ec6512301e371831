"""One single-node server shared by the deploy tests: the reference for Ray's images and
the source of the live /metrics scrape that the monitoring configs are checked against."""
from pathlib import Path

import pytest

from tests.server.serving import ServerProcess, openai_client

RF_SHAPES = Path(__file__).parents[2] / "rfserve/model_zoo/rf_shapes/checkpoints/rf-shapes/model_index.json"


@pytest.fixture(scope="session")
def served_model(tiny_sd) -> tuple[str, str, str]:
    """(SPEC, model name, size): the shipped rf-shapes model when it exists, else the tiny random SD."""
    if RF_SHAPES.exists():
        return "rf-shapes", "rf-shapes", "64x64"
    return f"instaflow-0.9b={tiny_sd}", "instaflow-0.9b", "16x16"


@pytest.fixture(scope="session")
def single_node(served_model):
    spec, name, size = served_model
    server = ServerProcess("--model", spec, "--no-warmup")
    client = openai_client(server)
    client.images.generate(model=name, prompt="a red circle", size=size, extra_body={"seed": 0})
    yield server
    server.stop()
