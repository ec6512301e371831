"""Each kernels test starts with no cached dispatch decisions and no backend override."""
import pytest

from rfserve import kernels
from rfserve.kernels import dispatch


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    kernels.clear_decisions()
    yield
    kernels.clear_decisions()
