"""A tiny random JanusFlow checkpoint in the official layout, written once per session."""
import pytest

from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint


@pytest.fixture(scope="session")
def tiny_janus(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny-janusflow"), "tiny", seed=0)


@pytest.fixture(scope="session")
def janus_pipe(tiny_janus):
    from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline

    return JanusFlowPipeline.from_pretrained(tiny_janus)
