"""Torch's thread count for a stretch of tests, restored after: the tiny models are all per-op overhead, and on a
shared CPU two OpenMP threads spin against each other (measured: 7 s vs 0.1 s per tiny Hunyuan-DiT image)."""
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
