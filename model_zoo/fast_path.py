"""The GPU fast path for SD-UNet pipelines: channels_last, our attention processor, and
torch.compile'd UNet and VAE decoder captured per (batch, size) bucket during warm-up.

Compiled graphs are static-shape (`dynamic=False`; with "reduce-overhead" also CUDA
graphs), so after warm-up only captured shapes take the compiled path and every other
shape runs eagerly: a request never triggers a compile. The inductor cache lives in a
persistent folder, so the second start compiles from cache.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels

log = logging.getLogger("rfserve.fast_path")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfserve" / "inductor"


@dataclass
class Compiled:
    """Compiled callables and the input shapes they were captured for."""
    unet: object
    decode: object
    capturing: bool = True
    unet_shapes: set[tuple[int, ...]] = field(default_factory=set)
    decode_shapes: set[tuple[int, ...]] = field(default_factory=set)

    def pick(self, eager, fast, shapes: set, shape: torch.Size):
        if self.capturing:
            shapes.add(tuple(shape))
        elif tuple(shape) not in shapes:
            return eager
        torch.compiler.cudagraph_mark_step_begin()   # earlier graph outputs are consumed by now
        return fast


def enable_compile_cache(folder: Path = DEFAULT_CACHE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


@dataclass
class SDFastPath:
    """The SD-UNet families' `FastPath` (model_zoo.base)."""
    parts: object                          # SDComponents: the pipeline's UNet, VAE and the compiled slot

    def prepare(self, compile_mode: str | None) -> None:
        """channels_last + our attention everywhere; compile UNet and decoder when asked."""
        parts = self.parts
        for module in (parts.unet, parts.vae):
            module.to(memory_format=torch.channels_last)
            kernels.install_attention(module)
        if compile_mode:
            enable_compile_cache()
            parts.compiled = Compiled(
                unet=torch.compile(parts.unet, mode=compile_mode, fullgraph=True, dynamic=False),
                decode=torch.compile(parts.vae.decode, mode=compile_mode, fullgraph=True, dynamic=False))

    def finish_capture(self) -> None:
        compiled = self.parts.compiled
        if compiled is not None:
            compiled.capturing = False
            log.info("captured UNet shapes %s, decoder shapes %s",
                     sorted(compiled.unet_shapes), sorted(compiled.decode_shapes))

    def drop(self, reason: str) -> None:
        """Fall back to eager for good when capture fails, so the server still serves."""
        log.error("compiled path disabled, serving eagerly: %s", reason)
        self.parts.compiled = None
