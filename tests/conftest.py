"""Test-wide settings: Triton runs in its CPU interpreter when no GPU is present,
and `@pytest.mark.gpu` tests are skipped there."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel launches (see shared/reference/kernels.md §2c).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random-weight SD1.5-layout checkpoint written with save_pretrained."""
    from rfserve.model_zoo.sd_config import save_random_sd

    return save_random_sd(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)
