"""The engine: loads the models, warms them, and owns everything that runs them: the image batcher and
worker, and one chat batcher per chat model. Draining, the watchdog and shutdown see all of them.
`rfserve serve` puts HTTP in front of it; `rfserve generate` calls it in-process."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rfserve.kernels import dispatch, tuning
from rfserve.model_zoo.base import (ChatParts, FastPath, ImageSpec, LoadedModel, ModelCard, Pipeline, ReservesMemory,
                                    ServesLora, parse_size)
from rfserve.model_zoo.registry import load_model, resolve_dtype
from rfserve.server.adapters import Adapters, parse_lora
from rfserve.server.buckets import BucketPlan
from rfserve.server.chat.batcher import ContinuousBatcher, TokenMetrics
from rfserve.server.config import ServerConfig
from rfserve.server.device import DeviceTurns, resolve_device
from rfserve.server.memory import ChatNeed, KVBudgetTooSmall, log_plan, size_chat_kv
from rfserve.server.metrics import Metrics
from rfserve.server.scheduler import Batcher, Job
from rfserve.server.sources import LoadError, model_specs
from rfserve.server.threads import ThreadPlan, usable_cores
from rfserve.server.worker import Worker

log = logging.getLogger("rfserve.engine")


class ShuttingDown(Exception):
    """Queued work refused because the server is stopping."""


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None, sources: dict[str, Path] | None = None):
        """`sources`: checkpoint folders by model name that the caller found already (server.sources); the
        engine finds the others as it loads them."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.specs = model_specs(config.models, config.model_root)
        self.sources = sources or {}
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model served twice: {names}")
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # On a small CPU the event loop, PNG encoding and the model compete for cores:
            # small batches leave one core to serving; warm-up finds the sizes that pay for all.
            torch.set_num_threads(config.cpu_threads or max(1, usable_cores() - 1))
        elif self.device.type == "cuda":
            self.metrics.track_cuda(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.models: dict[str, LoadedModel] = {}
        self.plans: dict[str, BucketPlan] = {}
        self.thread_plans: dict[str, ThreadPlan] = {}
        self.batcher = Batcher(names, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                               max_queue=config.max_queue, joining=config.continuous,
                               on_drop=lambda m, why: self.metrics.dropped.labels(m, why).inc())
        for name in names:
            self.metrics.queue_depth.labels(name).set_function(lambda n=name: self.batcher.depth(n))
        self.worker: Worker | None = None
        self.ready = threading.Event()
        self.draining = threading.Event()
        self.load_error: str | None = None
        self.stuck_reason: str | None = None
        self._inflight: set[Job] = set()
        self._inflight_lock = threading.Lock()
        self.chat_batchers: dict[str, ContinuousBatcher] = {}
        self.kv_blocks: dict[str, int] = {}   # each chat model's KV pool, in blocks (sized at the end of load)
        self._chat_lock = threading.Lock()
        self.turns = DeviceTurns()            # one forward at a time on the device: image steps and chat turns
        self.adapters = Adapters(self.turns, config.model_root, config.lora.per_request)
        self.later: list[tuple[str, FastPath]] = []     # fast paths captured after ready (the CPU's default)
        self.captured_later = threading.Event()         # set once they are, or have failed
        self._capture_thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def cards(self) -> dict[str, ModelCard]:
        return {name: m.card for name, m in self.models.items()}

    def load(self, progress: bool = True) -> None:
        """Load every model, warm it (capturing the fast path when compiling, on CUDA by default), start
        the worker, then flip ready."""
        log_plan(self.specs, self.device, self.dtype, self.config)
        for spec in tqdm(self.specs, desc="loading models", unit="model", disable=not progress):
            start = time.perf_counter()
            try:
                model = load_model(spec, self.device, self.dtype, self.sources.get(spec.name))
                if isinstance(model.pipeline, ReservesMemory):
                    model.pipeline.reserve_memory(self.config.max_batch)
                if self.config.lora.on and isinstance(model.pipeline, ServesLora):
                    model.pipeline.enable_lora(self.config.lora.pool(self.config.max_batch, self.buckets))
                    self.adapters.serve(spec.name, model.pipeline)
            except Exception as err:
                raise LoadError(spec, "loading", err) from err
            if self.config.max_steps:
                # The cap binds the model's default too: a request that names no steps stays valid.
                cap, d = min(model.card.max_steps, self.config.max_steps), model.card.defaults
                model.card = replace(model.card, max_steps=cap, defaults=replace(d, steps=min(d.steps, cap)))
            self.models[spec.name] = model
            log.info("loaded %s from %s in %.1fs", spec.name, spec.source, time.perf_counter() - start)
        self._load_adapters()
        tuning.thaw()
        if self.config.warmup:
            for spec in self.specs:
                try:
                    self._warm(spec.name, self.models[spec.name], progress)
                    if dispatch.can_measure(self.device):
                        self._tune_sizes(spec.name, self.models[spec.name], progress)
                except Exception as err:
                    raise LoadError(spec, "warming up", err) from err
        self._size_chat_kv()                  # after warm-up: the KV gets what the image batches left
        if self.compiling:
            for name in self.kv_blocks:
                self._capture_chat(name)
        tuning.freeze()                       # a request never waits on a kernel benchmark (kernels.tuning)
        self.worker = Worker(self.batcher, {n: m.pipeline for n, m in self.models.items()}, self.metrics,
                             turns=self.turns, fault_injection=self.config.fault_injection, plans=self.plans,
                             threads=self.thread_plans, joining=self.config.continuous)
        self.worker.start()
        self.metrics.ready.set(1)
        self.ready.set()
        if self.later:
            self._capture_thread = threading.Thread(target=self._capture_later, name="rfserve-capture", daemon=True)
            self._capture_thread.start()
        else:
            self.captured_later.set()

    def _load_adapters(self) -> None:
        """`--lora`'s adapters, before warm-up; one that cannot load stops the start, naming it."""
        for source in map(parse_lora, self.config.lora.adapters):
            try:
                self.adapters.load(source.name, source.source, self.adapters.model_for(source.model, self.cards),
                                   trusted=True)
            except Exception as err:
                spec = next((s for s in self.specs if s.name == source.model), self.specs[0])
                raise LoadError(spec, f"loading the LoRA adapter {source.name!r}", err) from err

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes warm-up prepares: the configured buckets up to `--max-batch`."""
        return tuple(b for b in self.config.batch_buckets if b <= self.config.max_batch) or (1,)

    @property
    def compiling(self) -> bool:
        return self.config.compile == "on" or (self.config.compile == "auto" and self.device.type == "cuda")

    def _warm(self, name: str, model: LoadedModel, progress: bool) -> None:
        pipe, card = model.pipeline, model.card
        fast = pipe.fast_path() if self.device.type == "cuda" or self.config.compile != "off" else None
        if fast is None or (self.device.type == "cpu" and not self.compiling):   # CPU auto: after ready, or never
            later = fast if fast is not None and fast.background else None
            if later is not None:
                later.prepare(self.config.compile_mode, record=True)
            for _ in tqdm(range(1), desc=f"warming {name}", disable=not progress):
                pipe.run([self.default_spec(card, "warm-up", 0)])
            if self.device.type == "cpu" and self.config.cpu_threads is None:
                self._plan_threads(name, pipe, card)
            if later is not None:
                later.record_calls(lambda: self._run_buckets(name, pipe, card))
                self.later.append((name, later))
            return
        fast.prepare(self.config.compile_mode if self.compiling else None)
        buckets = self.buckets
        try:
            for b in tqdm(buckets, desc=f"capturing {name}", unit="bucket", disable=not progress):
                for _ in range(2):                  # compile, then record the CUDA graph
                    pipe.run([self.default_spec(card, "warm-up", i) for i in range(b)])
            fast.finish_capture()
            self.plans[name] = BucketPlan.measure(buckets, lambda n: self._time_batch(pipe, card, n))
        except Exception as err:  # noqa: BLE001 — any compile failure leaves the eager path serving
            fast.drop(f"{type(err).__name__}: {err}")

    @property
    def compiling_in_background(self) -> bool:
        return self._capture_thread is not None and self._capture_thread.is_alive()

    def _capture_later(self) -> None:
        """Compile what each recorded fast path's warm-up saw, beside the worker, which serves eagerly until every
        recorded shape has its graph (model_zoo.fast_path.Captured). A cold compile takes minutes on a small CPU;
        a start reaches ready as soon as it did without compiling."""
        try:
            for name, fast in self.later:
                if self._closing.is_set():
                    return
                start = time.perf_counter()
                try:
                    fast.capture_examples()
                    log.info("%s: compiled path captured after ready in %.1fs", name, time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001 — any compile failure leaves the eager path serving
                    fast.drop(f"{type(err).__name__}: {err}")
        finally:
            self.captured_later.set()

    def _capture_chat(self, name: str) -> None:
        """Start the chat model's batcher now, and capture its decode step per bucket of running sequences (and,
        where the torch twin attends, of block-table width)."""
        decoder = self.chat_batcher(name).decoder
        fast = decoder.fast_path(self.config.batch_buckets)
        fast.prepare(self.config.compile_mode)
        try:
            with self.turns.turn():
                decoder.capture()
            fast.finish_capture()
        except Exception as err:  # noqa: BLE001 — any compile failure leaves the eager path serving
            fast.drop(f"{type(err).__name__}: {err}")

    def _plan_threads(self, name: str, pipe: Pipeline, card: ModelCard) -> None:
        base, wide = torch.get_num_threads(), usable_cores()
        warmed: set[tuple[int, int]] = set()

        def seconds(n: int, threads: int) -> float:
            # One sampling step: the choice depends on how much work each op has (batch and
            # image size), not on how many steps repeat it, and many-step models stay cheap to time.
            specs = self._one_step(card, n)
            torch.set_num_threads(threads)
            try:
                if (n, threads) not in warmed:          # first runs allocate and start the thread pool
                    pipe.run(specs)
                    warmed.add((n, threads))
                start = time.perf_counter()
                pipe.run(specs)
                return time.perf_counter() - start
            finally:
                torch.set_num_threads(base)

        plan = ThreadPlan.measure(self.buckets, base, wide, seconds, single_image_s=seconds(1, base))
        self.thread_plans[name] = plan
        log.info("%s on CPU: %s", name, plan.describe())

    def _tune_sizes(self, name: str, model: LoadedModel, progress: bool) -> None:
        """One step of every size the model accepts at every batch bucket, so that the kernels time their
        choices for every size bucket a request can reach while timing is still allowed."""
        card = model.card
        shapes = [(size, b) for size in card.sizes for b in self.buckets]
        for size, b in tqdm(shapes, desc=f"tuning kernels for {name}", unit="shape", disable=not progress):
            try:
                model.pipeline.run(self._one_step(card, b, size))
            except torch.OutOfMemoryError:
                # The worker splits a batch this large at this size, so its buckets are never served.
                torch.cuda.empty_cache()
                log.info("%s: %d images of %s do not fit at once; not tuned", name, b, size)

    def _run_buckets(self, name: str, pipe: Pipeline, card: ModelCard) -> None:
        """One step of every bucket, each at the thread count the worker will give it: the calls that the
        capture after ready compiles."""
        base, plan = torch.get_num_threads(), self.thread_plans.get(name)
        try:
            for b in self.buckets:
                if plan is not None:
                    plan.apply(b)
                pipe.run(self._one_step(card, b))
        finally:
            torch.set_num_threads(base)

    def _one_step(self, card: ModelCard, n: int, size: str | None = None) -> list[ImageSpec]:
        """n warm-up images (seeds 0..n-1) of one sampling step, at `size` or the model's default: what warm-up
        times or records depends on the work per step, not on how many steps repeat it."""
        spec = replace(self.default_spec(card, "warm-up", 0), steps=1)
        if size is not None:
            width, height = parse_size(size)
            spec = replace(spec, width=width, height=height)
        return [replace(spec, seed=i) for i in range(n)]

    def _time_batch(self, pipe: Pipeline, card: ModelCard, n: int, repeats: int = 3) -> float:
        specs = [self.default_spec(card, "warm-up", i) for i in range(n)]
        pipe.run(specs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.run(specs)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    @staticmethod
    def default_spec(card: ModelCard, prompt: str, seed: int) -> ImageSpec:
        d = card.defaults
        width, height = parse_size(d.size)
        return ImageSpec(prompt, d.negative_prompt, seed, width, height, d.steps, d.guidance)

    @property
    def healthy(self) -> tuple[bool, str | None]:
        if self.load_error:
            return False, self.load_error
        if self.worker is not None and not self.worker.alive:
            return False, "the worker thread stopped"
        if self.stuck_reason:
            return False, self.stuck_reason
        return True, None

    def submit(self, model: str, specs: list[ImageSpec], timeout_s: float | None = None,
               device_jpeg: int | None = None, partial_images: int = 0,
               on_partial: Callable[[int, np.ndarray], None] | None = None) -> Job:
        """Queue `specs`; a streaming request's `partial_images` previews go to `on_partial` (see Job)."""
        deadline = time.monotonic() + (timeout_s or self.config.request_timeout_s)
        job = Job(model=model, specs=specs, deadline=deadline, device_jpeg=device_jpeg,
                  partial_images=partial_images, on_partial=on_partial)
        adapters = self.adapters.hold(specs)
        with self._inflight_lock:
            self._inflight.add(job)
        try:
            self.batcher.submit(job)
        except Exception:
            self._forget(job)
            self.adapters.release(adapters)
            raise

        def answered(_) -> None:
            self._forget(job)
            self.adapters.release(adapters)

        job.future.add_done_callback(answered)
        return job

    def _forget(self, job: Job) -> None:
        with self._inflight_lock:
            self._inflight.discard(job)

    def chat_parts(self, name: str) -> ChatParts:
        parts = self.models[name].chat
        assert parts is not None, f"{name} does not chat"   # the chat route only asks for models that do
        return parts

    def chat_max_len(self, name: str) -> int:
        """Tokens one sequence may hold: `--chat-max-len`, never past the model's context."""
        context = self.chat_parts(name).context_length
        return min(self.config.chat.max_len or context, context)

    def _size_chat_kv(self) -> None:
        """Each chat model's KV pool in blocks, from the budget that loading and warm-up left (server.memory)."""
        needs = [ChatNeed(name, m.chat.kv_bytes_per_token, self.chat_max_len(name))
                 for name, m in self.models.items() if m.chat is not None]
        if not needs:
            return
        try:
            self.kv_blocks = size_chat_kv(needs, self.device, self.config.device_memory,
                                          self.config.gpu_memory_utilization,
                                          self.config.chat.slots_on(self.device.type))
        except KVBudgetTooSmall as err:
            spec = next(s for s in self.specs if s.name == err.name)
            raise LoadError(spec, "sizing its chat KV cache", err) from err

    def chat_batcher(self, name: str) -> ContinuousBatcher:
        """The chat model's batcher, started on first use (its KV cache is allocated then)."""
        with self._chat_lock:
            if name not in self.chat_batchers:
                parts, m = self.chat_parts(name), self.metrics
                slots, max_len = self.config.chat.slots_on(self.device.type), self.chat_max_len(name)
                decoder = parts.decoder(slots, max_len, self.kv_blocks[name])
                tokens = TokenMetrics(m.chat_first_token.labels(name), m.chat_token_gap.labels(name),
                                      m.chat_tokens.labels(name), m.chat_preemptions.labels(name))
                batcher = ContinuousBatcher(decoder, parts.tokenizer, parts.processor.eos_id,
                                            max_waiting=self.config.chat.max_waiting, metrics=tokens,
                                            turns=self.turns).start()
                m.chat_sequences.labels(name, "running").set_function(lambda: batcher.load[0])
                m.chat_sequences.labels(name, "waiting").set_function(lambda: batcher.load[1])
                m.chat_slots.labels(name).set(decoder.slots)
                pool = decoder.blocks
                m.chat_kv_blocks.labels(name, "free").set_function(lambda: pool.free_blocks)
                m.chat_kv_blocks.labels(name, "used").set_function(lambda: pool.capacity - pool.free_blocks)
                self.chat_batchers[name] = batcher
            return self.chat_batchers[name]

    def busy(self) -> bool:
        """Any accepted image job not yet answered, or any chat sequence running or waiting."""
        with self._inflight_lock:
            if self._inflight:
                return True
        return any(sum(b.load) for b in list(self.chat_batchers.values()))

    @property
    def busy_since(self) -> float | None:
        """When the oldest forward now running began (image batch or chat step); None when idle."""
        starts = [self.worker.busy_since if self.worker else None,
                  *(b.busy_since for b in list(self.chat_batchers.values()))]
        return min((s for s in starts if s is not None), default=None)

    def fail_queued(self, message: str) -> None:
        """The end of a drain: queued images get `message` (503); chat streams still open end with an
        error event, which the route turns into an error chunk and `data: [DONE]`."""
        for job in self.batcher.drain():
            job.fail(ShuttingDown(message))
        for batcher in list(self.chat_batchers.values()):
            batcher.close()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self.fail_queued("the server is shutting down")
        self.batcher.close()
        if self.worker is not None:
            self.worker.join(timeout)
