"""Random-weight Hunyuan-DiT checkpoints in the official diffusers layout, written once per session.

The tiny models are all per-op overhead; on a shared CPU two OpenMP threads spin against each
other (measured: 7 s vs 0.1 s per image), so these tests run torch on one thread and restore
the setting afterwards."""
import pytest
import torch

from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_hunyuan(tmp_path_factory):
    """v1.2-style: no style / image-size conditioning."""
    return save_random_hunyuan(tmp_path_factory.mktemp("hunyuan-v12"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_hunyuan_v11(tmp_path_factory):
    """v1.1-style: use_style_cond_and_image_meta_size=True, beta_end 0.03."""
    return save_random_hunyuan(tmp_path_factory.mktemp("hunyuan-v11"), "tiny-v1.1", seed=1)
