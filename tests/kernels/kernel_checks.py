"""Comparison helpers shared by the kernels tests."""
import torch

from rfserve.kernels.dispatch import TOLERANCE

# The same checks run on the compiled kernels where CUDA exists, and in the interpreter elsewhere.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_to(actual, expected):
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "an element was left unwritten (poison) or overflowed"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
