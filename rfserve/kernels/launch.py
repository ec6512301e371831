"""Where a Triton kernel may run (CUDA, or any device under the CPU interpreter, TRITON_INTERPRET=1), and
the launch record the wrappers build, so that the compile check compiles exactly the arguments a launch passes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton {what} needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the @triton.jit function (untuned), its positional arguments, its constexpr keywords,
    and the meta-parameter sets it may run with (one per autotune config; `{}` with Triton's default warps
    and stages for an untuned kernel)."""

    kernel: Any
    args: tuple
    constexprs: dict
    configs: list = field(default_factory=list)
