"""A tiny random Janus checkpoint in the HF layout, written once per session."""
import pytest

from rfserve.model_zoo.janus.random_checkpoint import save_random_checkpoint


@pytest.fixture(scope="session")
def tiny_janus(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny-janus"), "tiny", seed=0)


@pytest.fixture(scope="session")
def janus_pipe(tiny_janus):
    from rfserve.model_zoo.janus.pipeline import JanusPipeline

    return JanusPipeline.from_pretrained(tiny_janus)
