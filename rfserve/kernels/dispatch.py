"""Per-shape choice between a Triton kernel and its torch twin.

A Triton kernel is only worth calling where it measured faster on this device, so the first "auto" call
for each (op, shape, dtype, device) key on CUDA times both and caches the winner. Everywhere else the
twin runs: the CPU interpreter is a correctness tool, never a fast path.

Precedence: the call's `backend=` argument, then the shapes no kernel configuration fits
(`triton_unsupported`: those take the twin whatever the environment says), then
`RFSERVE_KERNELS=torch|triton|auto`, then measurement.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

BACKENDS = ("auto", "triton", "torch")
ENV = "RFSERVE_KERNELS"
WARMUP, REPEAT = 3, 10
# Attention head dims above this fit no configuration of the Triton kernel on sm_80 or sm_90: at a padded
# 512 (SD's VAE) every tile asks 257-641 KB of shared memory or spills (python -m
# rfserve.benchmarks.compile_kernels). SDPA serves them.
MAX_ATTENTION_HEAD_DIM = 256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What "auto" picked for one key, and the medians (ms) that picked it; None where nothing was timed."""

    backend: str
    triton_ms: float | None = None
    torch_ms: float | None = None
    reason: str = ""


_decisions: dict[tuple, Decision] = {}


def decisions() -> dict[tuple, Decision]:
    """A copy of the cached choices, keyed (op, shape/dtype key, device)."""
    return dict(_decisions)


def clear_decisions() -> None:
    _decisions.clear()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str) -> str:
    """The backend a call asks for once the environment override is applied."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    env = os.environ.get(ENV, "auto") or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {BACKENDS}, got {env!r}")
    return env


def triton_unsupported(op: str, head_dim: int | None = None) -> str:
    """Why `op` must not run in Triton at this shape, or "" where it may: the rule the compile check found."""
    if op == "attention" and head_dim is not None and head_dim > MAX_ATTENTION_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_ATTENTION_HEAD_DIM}: no kernel configuration fits (SDPA serves it)"
    return ""


def run(
    op: str,
    key: Hashable,
    device: torch.device,
    backend: str,
    triton_fn: Callable[[], torch.Tensor],
    torch_fn: Callable[[], torch.Tensor],
    unsupported: str = "",
) -> torch.Tensor:
    """`unsupported` (from `triton_unsupported`) sends every call but an explicit `backend="triton"` to the
    twin; "auto" records why."""
    if unsupported and backend != "triton":
        if resolve(backend) == "auto":
            _decisions.setdefault((op, key, str(device)), Decision("torch", reason=unsupported))
        return torch_fn()
    choice = resolve(backend)
    if choice == "auto":
        choice = _choose((op, key, str(device)), device, triton_fn, torch_fn)
    return triton_fn() if choice == "triton" else torch_fn()


def can_measure(device: torch.device) -> bool:
    """Timing means something only on CUDA with Triton installed."""
    return device.type == "cuda" and triton_available()


def _choose(full_key: tuple, device: torch.device, triton_fn, torch_fn) -> str:
    cached = _decisions.get(full_key)
    if cached is not None:
        return cached.backend
    if not can_measure(device):
        _decisions[full_key] = Decision("torch", reason=f"no measurement on {device.type}")
        return "torch"
    if _inside_graph():
        # Timing would be recorded into the graph (or traced); take the twin and measure on an eager call.
        return "torch"
    torch_ms = time_ms(torch_fn)
    try:
        triton_ms = time_ms(triton_fn)
    except Exception as exc:  # a config the kernel cannot compile must not take the server down
        log.warning("Triton %s failed at warm-up, using torch: %s", full_key[0], exc)
        _decisions[full_key] = Decision("torch", None, torch_ms, reason=f"triton failed: {exc}")
        return "torch"
    winner = "triton" if triton_ms < torch_ms else "torch"
    _decisions[full_key] = Decision(winner, triton_ms, torch_ms, reason="measured")
    return winner


def _inside_graph() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def time_ms(fn: Callable[[], object]) -> float:
    """Median of REPEAT calls after WARMUP, with CUDA events."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEAT):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
