"""Each kernels test starts with no cached dispatch decisions, no backend override, and measuring allowed."""
import pytest

from rfserve import kernels
from rfserve.kernels import dispatch, tuning


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    kernels.clear_decisions()
    tuning.thaw()
    yield
    kernels.clear_decisions()
    tuning.thaw()
