"""Per-shape choice between a Triton kernel and its torch twin.

A Triton kernel is only worth calling where it measured faster on this device, so the first "auto" call
for each (op, kind, size bucket, device) key on CUDA times both and caches the winner; once the server is
ready (`tuning.freeze`) a bucket nobody timed takes the nearest timed bucket's winner instead. Everywhere
else the twin runs: the CPU interpreter is a correctness tool, never a fast path.

The first launch of the kernel for each key is checked against the twin on the same input (`TOLERANCE` by
dtype): a mismatch or a launch error sends that key to the twin for good, with one log line, so a miscompiled
configuration on some device costs one slow call, never a wrong image.

Precedence: the call's `backend=` argument, then the shapes no kernel configuration fits
(`triton_unsupported`) and the keys whose kernel failed its self-check (both take the twin whatever the
environment says), then `RFSERVE_KERNELS=torch|triton|auto`, then measurement.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from rfserve.kernels import tuning

BACKENDS = ("auto", "triton", "torch")
ENV = "RFSERVE_KERNELS"
WARMUP, REPEAT = 3, 10
# Attention head dims above this fit no configuration of the Triton kernel on sm_80 or sm_90: at a padded
# 512 (SD's VAE) every tile asks 257-641 KB of shared memory or spills (python -m
# rfserve.benchmarks.compile_kernels). SDPA serves them.
MAX_ATTENTION_HEAD_DIM = 256
# The LoRA shrink keeps a (BLOCK_M, K_PAD·R_PAD) fp32 accumulator, its row's adapters side by side
# (`kernels.triton_lora`); sized for 4 adapters of rank 64. Wider bindings take the twin.
MAX_LORA_COLUMNS = 256
# (atol, rtol) of a kernel against its twin; fp16 and bf16 round p before the PV product, as FlashAttention does.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What "auto" picked for one key, and the medians (ms) that picked it; None where nothing was timed."""

    backend: str
    triton_ms: float | None = None
    torch_ms: float | None = None
    reason: str = ""


_decisions: dict[tuple, Decision] = {}
_checked: set[tuple] = set()          # keys whose kernel passed its self-check
_failed: dict[tuple, str] = {}        # keys whose kernel failed it, and why


def decisions() -> dict[tuple, Decision]:
    """A copy of the cached choices, keyed (op, kind key, size buckets, device)."""
    return dict(_decisions)


def clear_decisions() -> None:
    for cache in (_decisions, _checked, _failed):
        cache.clear()


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


def triton_unsupported(op: str, head_dim: int | None = None, *, lora_columns: int | None = None) -> str:
    """Why `op` must not run in Triton at this shape, or "" where it may: the rule the compile check found."""
    if op == "attention" and head_dim is not None and head_dim > MAX_ATTENTION_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_ATTENTION_HEAD_DIM}: no kernel configuration fits (SDPA serves it)"
    if op == "lora" and lora_columns is not None and lora_columns > MAX_LORA_COLUMNS:
        return f"{lora_columns} padded adapter columns > {MAX_LORA_COLUMNS}: the shrink's tile would not fit"
    return ""


def run(
    op: str,
    key: Hashable,
    device: torch.device,
    backend: str,
    triton_fn: Callable[[], torch.Tensor],
    torch_fn: Callable[[], torch.Tensor],
    unsupported: str = "",
    sizes: tuple[int, ...] = (),
) -> torch.Tensor:
    """`key` is what the kernel's speed depends on besides `sizes` (dtypes, head dim, flags); `sizes` (lengths,
    batch, elements) are kept by power-of-two bucket. `unsupported` (from `triton_unsupported`) sends every call
    but an explicit `backend="triton"` to the twin, as a failed self-check does; "auto" records why."""
    full_key = (op, key, tuning.buckets(sizes), str(device))
    unsupported = unsupported or _failed.get(full_key, "")
    if unsupported and backend != "triton":
        if resolve(backend) == "auto" and full_key not in _decisions:
            _decisions[full_key] = Decision("torch", reason=unsupported)
        return torch_fn()
    choice = resolve(backend)
    if choice == "auto":
        choice = _choose(full_key, device, triton_fn, torch_fn)
    if choice == "torch":
        return torch_fn()
    # Asked for by name, traced (the eager call before a compile checked it; a set read here would be a guard
    # that recompiles whenever another key is checked), or checked already.
    if backend == "triton" or _inside_graph() or full_key in _checked:
        return triton_fn()
    return _self_check(full_key, triton_fn, torch_fn)


def _self_check(full_key: tuple, triton_fn, torch_fn) -> torch.Tensor:
    """The kernel's first launch for a key, against the twin on the same input."""
    expected = torch_fn()
    try:
        problem = mismatch(triton_fn(), expected)
    except Exception as exc:  # noqa: BLE001 — a launch error disables the key, it must not fail the request
        problem = f"launch failed: {type(exc).__name__}: {exc}"
    if problem:
        log.warning("Triton %s disabled for %s, the twin serves it: %s", full_key[0], full_key[1:], problem)
        _failed[full_key] = f"self-check failed: {problem}"
        _decisions[full_key] = Decision("torch", reason=_failed[full_key])
    else:
        _checked.add(full_key)
    return expected


def mismatch(out: torch.Tensor, expected: torch.Tensor) -> str:
    """Why the kernel's `out` is not the twin's `expected` within `TOLERANCE`; "" when it is."""
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"got {out.dtype} {tuple(out.shape)}, the twin {expected.dtype} {tuple(expected.shape)}"
    atol, rtol = TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32])
    got, want = out.float(), expected.float()
    if torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        return ""
    worst = (got - want).abs().nan_to_num(float("inf")).max().item()
    return f"max abs difference {worst:.3g} beyond atol {atol:g} + rtol {rtol:g}"


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
    if tuning.frozen():
        _decisions[full_key] = _borrowed(full_key)
        return _decisions[full_key].backend
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


def _borrowed(full_key: tuple) -> Decision:
    """After ready: the winner of the nearest measured bucket of the same op, kind and device; else the twin."""
    op, key, sizes, device = full_key
    timed = {k[2]: d for k, d in _decisions.items()
             if (k[0], k[1], k[3]) == (op, key, device) and d.reason == "measured"}
    near = tuning.nearest(sizes, timed)
    if near is None:
        return Decision("torch", reason="not measured before ready")
    return Decision(timed[near].backend, reason=f"bucket {near}'s choice: nothing is measured after ready")


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
