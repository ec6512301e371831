"""Triton kernels with plain-torch twins."""
