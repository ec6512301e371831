"""The compiled fast path, shared by every family: hot calls torch.compile'd and captured per bucket in warm-up.

Compiled graphs are static-shape (`dynamic=False`; with "reduce-overhead" also CUDA graphs), so after warm-up
only the captured shapes take the compiled path and every other shape runs eagerly: a request never triggers a
compile. A hot call whose rows are independent (a denoiser's batch) runs a batch between two captured ones padded
to the larger, so the any-size forwards of continuous batching stay on the graphs (`Captured.padded`). A graph
also guards on the process's intra-op thread count, which the CPU worker sets per batch (server.threads), so a
shape is captured together with the count it will run under. The inductor cache lives in a persistent folder, so the second start compiles from cache. On CUDA the
capture runs before ready; on the CPU, where a cold compile takes minutes, it runs after ready beside the
worker for the families that declare it safe (`CompiledCalls.background`).

A family names its hot calls as attributes of one of its objects (SD: `parts.denoiser` and `parts.vae_decode`;
Hunyuan-DiT: `parts.denoiser`; JanusFlow: `parts.flow_step`; chat: a slot decoder's `step`). `CompiledCalls`
swaps each for a `Captured` and back again when capture fails, so the pipelines themselves never branch on it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rfserve import kernels
log = logging.getLogger("rfserve.fast_path")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfserve" / "inductor"
# Held while a compile on the capture thread has fixed the intra-op thread count (one count for the whole
# process) that its graph will guard on; the worker leaves the count be meanwhile (server.threads.ThreadPlan).
THREAD_COUNT = threading.Lock()
RECOMPILE_LIMIT = 256           # captures of one hot call's code object, every instance together (see `prepare`)


def enable_compile_cache(folder: Path = DEFAULT_CACHE) -> None:
    """Point inductor's caches (its graph cache and the AOT autograd cache, both on by default) at `folder`.
    torch reads those switches once, at import; the folder it reads at each use, so setting it here works."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def call_key(args: tuple, kwargs: dict) -> tuple:
    """What a static-shape graph guards on that differs between calls: the intra-op thread count (part of
    dynamo's global-state guard) and the shape of every tensor argument."""
    shapes = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return (torch.get_num_threads(), *shapes)


@dataclass(frozen=True)
class Example:
    """A hot call's arguments, copied, and the autograd mode it ran under. A graph guards on both, down to
    whether each tensor is an inference tensor, so a copy that differed would compile a graph for other calls."""
    args: tuple
    kwargs: dict
    inference: bool
    grad: bool

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> "Example":
        memo: dict[int, object] = {}
        return cls(_copy(args, memo), _copy(kwargs, memo), torch.is_inference_mode_enabled(), torch.is_grad_enabled())


def _copy(obj, memo: dict[int, object]):
    """Tensors cloned as they are (strides, inference or not, static marks), inside tuples, lists, dicts and
    dataclasses; a tensor passed twice is copied once, so the copies alias as the arguments did."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        with torch.inference_mode(obj.is_inference()):
            out = obj.clone()                                  # preserve_format: the same strides
        out.__dict__.update(obj.__dict__)                      # `mark_static_address` lives there
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_copy(o, memo) for o in obj)
    elif isinstance(obj, dict):
        out = {k: _copy(v, memo) for k, v in obj.items()}
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = dataclasses.replace(obj, **{f.name: _copy(getattr(obj, f.name), memo) for f in dataclasses.fields(obj)
                                          if f.init})
    else:
        return obj
    memo[id(obj)] = out
    return out


@dataclass
class Captured:
    """A compiled callable and the calls (`call_key`) it was captured for; every other call runs the eager one.

    Captured one of two ways. Before ready (CUDA, `--compile on`): while `capturing`, each new key compiles on
    its call. After ready (the CPU's default): warm-up's eager calls, once recording, leave a copy of their
    arguments per key in `examples`, and `compile_examples`, on a background thread, compiles each on its copy,
    under its thread count, while the worker goes on serving eagerly; the keys switch over only once their
    graphs exist, so no request waits on a compile.
    """
    eager: Callable
    fast: Callable
    capturing: bool = True
    shapes: set[tuple] = field(default_factory=set)            # the `call_key`s captured
    examples: dict[tuple, Example] | None = None                # recording while not None
    pads: bool = False                                          # rows are independent: see `padded`

    def __call__(self, *args, **kwargs):
        key = call_key(args, kwargs)
        if key in self.shapes:
            torch.compiler.cudagraph_mark_step_begin()   # earlier graph outputs are consumed by now
            return self.fast(*args, **kwargs)
        if self.pads and not self.capturing and (rows := self.padded(key)) is not None:
            n = _rows(args, kwargs)
            torch.compiler.cudagraph_mark_step_begin()
            out = self.fast(*(_pad(a, n, rows) for a in args), **{k: _pad(v, n, rows) for k, v in kwargs.items()})
            return _cut(out, n, rows)
        if self.capturing:
            out = self._compile(args, kwargs)
            self.shapes.add(key)
            return out
        examples = self.examples                         # read once: the capture thread may end recording
        if examples is not None and key not in examples:
            examples[key] = Example.of(args, kwargs)
        return self.eager(*args, **kwargs)

    def padded(self, key: tuple) -> int | None:
        """For a call whose rows are independent (a denoiser's batch): the fewest rows of a captured call that this
        one fits by padding its batch-first tensors (the top-level ones as long as its first tensor), or None. A
        continuous batch's forward has any number of rows (rows without guidance bring no unconditional copy),
        and running it in the next captured bucket keeps it on the graph, as padding whole batches did."""
        if len(key) < 2 or not key[1]:
            return None
        n, fits = key[1][0], []
        for captured in self.shapes:
            if len(captured) != len(key) or captured[0] != key[0] or captured[1][0] <= n:
                continue
            m = captured[1][0]
            if all(c == ((m, *s[1:]) if s[:1] == (n,) else s) for c, s in zip(captured[1:], key[1:])):
                fits.append(m)
        return min(fits, default=None)

    def _compile(self, args: tuple, kwargs: dict):
        """Compile for these arguments' shapes; the caller then adds them to `shapes`.

        One eager call first settles what the graph would otherwise guard on as it changes: the kernel
        dispatcher's decisions, made and cached on a first call, would recompile each bucket. The CPU kernels
        read the thread count where they run, not where they compiled: the worker sets its own per batch
        (server.threads), and a count baked in at compile time would overrule it. Inductor's config is per
        thread, so it is set here, where the compile runs."""
        self.eager(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        with torch._inductor.config.patch({"cpp.dynamic_threads": True}):
            return self.fast(*args, **kwargs)

    def compile_examples(self) -> list[tuple]:
        """Compile every recorded call on its copy, under the thread count it was recorded with (the key's
        first part); returns their keys, for `CompiledCalls` to switch over."""
        examples, self.examples = list((self.examples or {}).items()), None     # a snapshot: recording stops
        for (threads, *_), example in examples:
            with THREAD_COUNT, torch.inference_mode(example.inference), torch.set_grad_enabled(example.grad):
                torch.set_num_threads(threads)
                self._compile(example.args, example.kwargs)
        return [key for key, _ in examples]


def _rows(args: tuple, kwargs: dict) -> int:
    """The call's batch: its first tensor's length."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0]


def _pad(arg, n: int, rows: int):
    """A batch-first tensor argument of n rows padded to `rows` by repeating its last row; any other as it is."""
    if isinstance(arg, torch.Tensor) and arg.ndim and arg.shape[0] == n:
        return torch.cat([arg, arg[-1:].expand(rows - n, *arg.shape[1:])])
    return arg


def _cut(out, n: int, rows: int):
    """The first n rows of a padded call's batch-first outputs, inside tuples and lists."""
    if isinstance(out, torch.Tensor):
        return out[:n] if out.ndim and out.shape[0] == rows else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cut(o, n, rows) for o in out)
    return out


@dataclass
class CompiledCalls:
    """A family's `FastPath` (model_zoo.base) over its hot calls, each an `(owner, attribute)`.

    `setup` runs whether or not anything is compiled (the SD families' channels_last and attention).
    `background` says that capture after ready is the CPU's default for this family: where compiled measured
    clearly faster on the CPU, and each hot call is a pure function of its arguments and the weights, so that
    running it on copies beside the worker touches nothing the worker uses (benchmarks/RESULTS.md, issue #22).
    """
    calls: list[tuple[object, str]]
    setup: Callable[[], None] | None = None
    background: bool = False
    pads: bool = False                  # each call's rows are independent: a call between buckets pads to one

    def prepare(self, compile_mode: str | None, *, record: bool = False) -> None:
        """Compile the hot calls with `compile_mode` (None: only `setup`). With `record`, nothing compiles on a
        call: the calls run eagerly, and record their arguments for `capture_examples` once `record_calls`
        says so."""
        if self.setup is not None:
            self.setup()
        if not compile_mode:
            return
        enable_compile_cache()
        # Dynamo compiles one code object at most `recompile_limit` (8) times, across every instance: the chat
        # step alone is captured per (row bucket, width bucket) for each chat model, well past 8, and a fullgraph
        # compile past the limit is an error. Only captured shapes ever compile (`Captured`), so the bound is ours.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for owner, name in self.calls:
            eager = getattr(owner, name)
            fast = torch.compile(eager, mode=compile_mode, fullgraph=True, dynamic=False)
            setattr(owner, name, Captured(eager, fast, capturing=not record, pads=self.pads))

    def record_calls(self, run: Callable[[], object]) -> None:
        """Run `run` with every hot call recording its arguments per `call_key`: the calls to compile later."""
        for c in self.captured.values():
            c.examples = {}
        run()

    @property
    def captured(self) -> dict[str, Captured]:
        found = {name: getattr(owner, name) for owner, name in self.calls}
        return {name: c for name, c in found.items() if isinstance(c, Captured)}

    def finish_capture(self) -> None:
        for name, c in self.captured.items():
            c.capturing = False
            log.info("captured %s for %d shapes", name, len(c.shapes))

    def capture_examples(self) -> None:
        """Compile every shape the recorded calls saw, each on its copied arguments (see `Captured`), then switch
        them all over at once: until every graph exists the worker runs none, so no compiled call ever runs
        beside a compile on the capture thread."""
        compiled = [(c, c.compile_examples()) for c in self.captured.values()]
        for c, keys in compiled:
            c.shapes.update(keys)
        self.finish_capture()

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
    return CompiledCalls([(parts, "denoiser"), (parts, "vae_decode")], setup, background=True, pads=True)
