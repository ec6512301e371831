"""Triton for the kernel modules, with the one-line fix when it is missing.

The base install has no Triton (the twins serve everywhere without it); a Triton path asked for
explicitly on such an install should say what to install, not print a bare ModuleNotFoundError.
"""
try:
    import triton
    import triton.language as tl
except ModuleNotFoundError as err:
    raise ModuleNotFoundError("the Triton kernels need the gpu extra: pip install 'rfserve[gpu]'") from err

__all__ = ["tl", "triton"]
