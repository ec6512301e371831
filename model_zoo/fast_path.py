"""The compiled fast path, shared by every family: hot calls torch.compile'd and captured per bucket in warm-up.

Compiled graphs are static-shape (`dynamic=False`; with "reduce-overhead" also CUDA graphs), so after warm-up
only the captured shapes take the compiled path and every other shape runs eagerly: a request never triggers a
compile. The inductor cache lives in a persistent folder, so the second start compiles from cache.

A family names its hot calls as attributes of one of its objects (SD: `parts.denoiser` and `parts.vae_decode`;
Hunyuan-DiT: `parts.denoiser`; JanusFlow: `parts.flow_step`; chat: a slot decoder's `step`). `CompiledCalls`
swaps each for a `Captured` and back again when capture fails, so the pipelines themselves never branch on it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import kernels

log = logging.getLogger("rfserve.fast_path")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfserve" / "inductor"


def enable_compile_cache(folder: Path = DEFAULT_CACHE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of every tensor argument: what a static-shape graph was compiled for."""
    return tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


@dataclass
class Captured:
    """A compiled callable and the argument shapes warm-up ran it with; other shapes run the eager one."""
    eager: Callable
    fast: Callable
    capturing: bool = True
    shapes: set[tuple] = field(default_factory=set)

    def __call__(self, *args, **kwargs):
        key = shape_key(args, kwargs)
        if key not in self.shapes:
            if not self.capturing:
                return self.eager(*args, **kwargs)
            # One eager call first settles what the graph would otherwise guard on as it changes: the
            # kernel dispatcher's decisions, made and cached on a first call, would recompile each bucket.
            self.eager(*args, **kwargs)
            self.shapes.add(key)
        torch.compiler.cudagraph_mark_step_begin()   # earlier graph outputs are consumed by now
        return self.fast(*args, **kwargs)


@dataclass
class CompiledCalls:
    """A family's `FastPath` (model_zoo.base) over its hot calls, each an `(owner, attribute)`.

    `setup` runs whether or not anything is compiled (the SD families' channels_last and attention).
    """
    calls: list[tuple[object, str]]
    setup: Callable[[], None] | None = None

    def prepare(self, compile_mode: str | None) -> None:
        if self.setup is not None:
            self.setup()
        if not compile_mode:
            return
        enable_compile_cache()
        for owner, name in self.calls:
            eager = getattr(owner, name)
            setattr(owner, name, Captured(eager, torch.compile(eager, mode=compile_mode, fullgraph=True,
                                                               dynamic=False)))

    @property
    def captured(self) -> dict[str, Captured]:
        found = {name: getattr(owner, name) for owner, name in self.calls}
        return {name: c for name, c in found.items() if isinstance(c, Captured)}

    def finish_capture(self) -> None:
        for name, c in self.captured.items():
            c.capturing = False
            log.info("captured %s for %d shapes", name, len(c.shapes))

    def drop(self, reason: str) -> None:
        """Fall back to eager for good when capture fails, so the server still serves."""
        log.error("compiled path disabled, serving eagerly: %s", reason)
        for owner, name in self.calls:
            call = getattr(owner, name)
            if isinstance(call, Captured):
                setattr(owner, name, call.eager)


def sd_fast_path(parts) -> CompiledCalls:
    """SD-UNet families: channels_last and our attention everywhere; the UNet and the VAE decoder compiled."""
    def setup() -> None:
        for module in (parts.unet, parts.vae):
            module.to(memory_format=torch.channels_last)
        kernels.install_attention(parts.unet)
        kernels.install_attention(parts.vae, required=False)    # rf-shapes' VAE and the tiny VAEs have none
    return CompiledCalls([(parts, "denoiser"), (parts, "vae_decode")], setup)
