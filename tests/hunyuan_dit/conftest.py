"""Random-weight Hunyuan-DiT checkpoints in the official diffusers layout, written once per session. These tests
run torch on one thread (tests.threads says why) and restore the setting afterwards."""
import pytest

from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan
from tests.threads import torch_threads


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_hunyuan(tmp_path_factory):
    """v1.2-style: no style / image-size conditioning."""
    return save_random_hunyuan(tmp_path_factory.mktemp("hunyuan-v12"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_hunyuan_v11(tmp_path_factory):
    """v1.1-style: use_style_cond_and_image_meta_size=True, beta_end 0.03."""
    return save_random_hunyuan(tmp_path_factory.mktemp("hunyuan-v11"), "tiny-v1.1", seed=1)
