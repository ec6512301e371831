"""Comparison helpers shared by the kernels tests."""
import torch

# The same checks run on the compiled kernels where CUDA exists, and in the interpreter elsewhere.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (atol, rtol) against the twin; fp16 rounds p before the PV product, as FlashAttention does.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_close_to(actual, expected):
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "an element was left unwritten (poison) or overflowed"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
