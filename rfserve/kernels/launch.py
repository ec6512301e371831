"""Where a Triton kernel may run: CUDA, or any device under the CPU interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton {what} needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
