"""The peak memory a forward allocates, measured by running it on the meta device.

Meta tensors carry shapes, dtypes and storages but no data, so a 7B forward at batch 16 runs in
milliseconds on any CPU and allocates nothing. `PeakTracker` watches every op's outputs: a storage it has
not seen and that none of the op's inputs owns is new memory (its `nbytes`); a view or an in-place result
shares a storage and costs nothing. A storage is released when its last tensor dies, which
`weakref.finalize` on the storage object reports (torch keeps one Python object per live storage, so the
finaliser runs when the storage itself goes). The peak of the live total is what the forward needs on top
of what existed before it: the weights and the inputs.

What it cannot see: an allocator's rounding and caching, and the workspace a kernel takes for itself.
`scaled_dot_product_attention` stays one op on meta, so attention costs its output only, as the fused
(flash / memory-efficient) kernels serving uses on a GPU, and the CPU's flash kernel, allocate it.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created while the mode is on, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()             # StorageImpl addresses (`_cdata`) of live tracked storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        for t in tree_flatten(out)[0]:
            if _has_storage(t):
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key = storage._cdata
        if key in self._seen or key in inputs:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _has_storage(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


def peak_bytes(stage: Callable[[], object]) -> int:
    """The most memory `stage()` holds at once beyond what was live before it, under inference mode.
    Its result is dropped inside the measurement, so what it returns counts only while it is alive."""
    tracker = PeakTracker()
    with torch.inference_mode(), tracker:
        stage()
    return tracker.peak
