"""The LoRA adapters a server holds (issue #34): loaded at start (`--lora`) or at run time (`POST /v1/loras`), each
for one model, chosen per request (`lora`), and unloaded (`DELETE /v1/loras/NAME`) once no request uses it.

Names are one namespace across the served models, so a request naming another model's adapter is told whose it
is. A request holds its adapters from acceptance to its answer (`hold`); an adapter being deleted takes no new
request and leaves its pipeline after the last answer that used it. Its rows unpin their device slots as they
leave the running batch, which for a cancelled request can be a step after its answer: the unload then retries
between steps until the pool lets it go.

Reading a file (disk or hub) happens outside the device's turn; registering, which touches only the host copies
and the pool's tables, takes a turn, so it lands between two denoising steps of a running batch. Files read at
run time must be .safetensors: a pickled file can run code as it is read, and `--lora` is the operator's own.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

from rfserve.model_zoo.base import ImageSpec, ServesLora
from rfserve.server.device import DeviceTurns
from rfserve.server.errors import APIError, Code, model_not_found

log = logging.getLogger("rfserve.adapters")

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
Choice = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraSource:
    """One `--lora NAME=PATH_OR_HUB_ID[?model=MODEL]`."""
    name: str
    source: str
    model: str | None = None


def parse_lora(text: str) -> LoraSource:
    """A ValueError quoting the flag for anything but NAME=SOURCE with an optional model."""
    head, _, query = text.partition("?")
    name, eq, source = head.partition("=")
    options = dict(parse_qsl(query))
    if not eq or not re.fullmatch(NAME, name.strip()) or not source.strip() or set(options) - {"model"}:
        raise ValueError(f"--lora {text!r}: expected NAME=PATH_OR_HUB_ID[?model=MODEL], NAME of letters, digits, "
                         f"'.', '_' and '-'")
    return LoraSource(name.strip(), source.strip(), options.get("model"))


@dataclass
class Adapter:
    name: str
    model: str
    source: str
    rank: int
    components: list[str]
    created: int
    users: int = 0            # accepted requests not yet answered
    leaving: bool = False     # deleted: no new request, unloaded once `users` is 0


class Adapters:
    def __init__(self, turns: DeviceTurns, model_root: str | None, per_request: int):
        self.turns, self.model_root, self.per_request = turns, model_root, per_request
        self.pipelines: dict[str, ServesLora] = {}
        self._adapters: dict[str, Adapter] = {}
        self._loading: set[str] = set()                      # names a load under way holds
        self._lock = threading.Lock()

    def serve(self, model: str, pipeline: ServesLora) -> None:
        self.pipelines[model] = pipeline

    def listing(self, model: str | None = None) -> list[Adapter]:
        """The loaded adapters (of `model`), those being deleted left out."""
        with self._lock:
            return self._listed(model)

    def _listed(self, model: str | None) -> list[Adapter]:
        return [a for a in self._adapters.values() if not a.leaving and model in (None, a.model)]

    def model_for(self, model: str | None, served) -> str:
        """The model an adapter is loaded for: the one named, or the first served model that takes adapters."""
        if model is None:
            if not self.pipelines:
                raise APIError(Code.UNSUPPORTED_MODEL, "no model here serves LoRA adapters: start the server with "
                                                       "--enable-lora or --lora", param="model")
            return next(iter(self.pipelines))
        if model not in served:
            raise model_not_found(model, served)
        if model not in self.pipelines:
            raise APIError(Code.UNSUPPORTED_MODEL, f"{model} serves no LoRA adapters"
                           + ("" if self.pipelines else ": start the server with --enable-lora or --lora"),
                           param="model")
        return model

    def load(self, name: str, source: str, model: str, *, trusted: bool) -> Adapter:
        """Read and register an adapter for `model` (from `model_for`); blocks on the file and a device turn.
        `trusted`: the operator's own `--lora`, which may read pickled files."""
        from rfserve.model_zoo.lora.files import load_lora
        from rfserve.server.security import confine

        if not re.fullmatch(NAME, name):
            raise APIError(Code.INVALID_VALUE, f"name {name!r}: letters, digits, '.', '_' and '-', at most 64, "
                                               f"starting with a letter or digit", param="name")
        with self._lock:
            if name in self._adapters or name in self._loading:
                raise APIError(Code.LORA_EXISTS, f"an adapter named {name!r} is loaded already (or is loading or "
                                                 f"unloading); DELETE /v1/loras/{name} first", param="name")
            self._loading.add(name)
        try:
            try:
                lora = load_lora(confine(source, self.model_root), safetensors_only=not trusted)
            except Exception as err:  # noqa: BLE001 — CheckpointError, ValueError: both name the source
                raise APIError(Code.INVALID_VALUE, f"path: {err}", param="path") from err
            try:
                with self.turns.turn():
                    self.pipelines[model].register_lora(name, lora)
            except ValueError as err:
                raise APIError(Code.INVALID_VALUE, f"path: {err} (model {model})", param="path") from err
        except BaseException:
            with self._lock:
                self._loading.discard(name)
            raise
        adapter = Adapter(name, model, source, lora.rank, sorted(lora.components), int(time.time()))
        with self._lock:
            self._loading.discard(name)
            self._adapters[name] = adapter
        log.info("LoRA %r loaded for %s from %s (rank %d, %s)", name, model, source, lora.rank,
                 ", ".join(adapter.components))
        return adapter

    def remove(self, name: str) -> Adapter:
        """Take no new request for `name`; unload it now when no accepted request uses it, else after the last
        one's answer. A 404 for a name that is not loaded."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.leaving:
                raise APIError(Code.LORA_NOT_FOUND, f"no LoRA adapter {name!r} is loaded", param="name")
            adapter.leaving = True
            now = adapter.users == 0
        if now:
            self._unload(adapter)
        return adapter

    def choice(self, model: str, lora: list | None) -> Choice:
        """A request's `lora` (a list of objects with `name` and `scale`, as the schema normalises it) for
        `model`, checked: a 400 naming the field for anything the model cannot run."""
        if not lora:
            return ()
        if model not in self.pipelines:
            raise APIError(Code.INVALID_VALUE, f"lora: {model} serves no LoRA adapters", param="lora")
        if len(lora) > self.per_request:
            raise APIError(Code.INVALID_VALUE, f"lora: at most {self.per_request} adapters per request "
                                               f"(--max-loras-per-request), got {len(lora)}", param="lora")
        names = [c.name for c in lora]
        if len(set(names)) != len(names):
            raise APIError(Code.INVALID_VALUE, "lora: an adapter is named twice", param="lora")
        with self._lock:
            for n in names:
                adapter = self._adapters.get(n)
                if adapter is None or adapter.leaving:
                    raise APIError(Code.INVALID_VALUE, f"lora: no adapter {n!r} is loaded; loaded for {model}: "
                                   f"{[a.name for a in self._listed(model)]}", param="lora")
                if adapter.model != model:
                    raise APIError(Code.INVALID_VALUE, f"lora: adapter {n!r} is for {adapter.model}, not {model}",
                                   param="lora")
        return tuple((c.name, float(c.scale)) for c in lora)

    def hold(self, specs: list[ImageSpec]) -> list[str]:
        """The adapters `specs` use, held until `release`: a 400 for one deleted since the request was checked."""
        names = sorted({n for spec in specs for n, _ in spec.lora})
        with self._lock:
            for n in names:
                adapter = self._adapters.get(n)
                if adapter is None or adapter.leaving:
                    raise APIError(Code.INVALID_VALUE, f"lora: adapter {n!r} was just unloaded", param="lora")
            for n in names:
                self._adapters[n].users += 1
        return names

    def release(self, names: list[str]) -> None:
        """An answered request lets its adapters go; a deleted one with no user left unloads, on a thread of its
        own (this runs on the worker, which may hold the device's turn)."""
        done = []
        with self._lock:
            for n in names:
                adapter = self._adapters[n]
                adapter.users -= 1
                if adapter.leaving and adapter.users == 0:
                    done.append(adapter)
        for adapter in done:
            threading.Thread(target=self._unload, args=(adapter,), name=f"rfserve-unload-{adapter.name}",
                             daemon=True).start()

    def _unload(self, adapter: Adapter, retry_s: float = 0.05) -> None:
        """Unregister between two steps; while a row that already left its request still pins the adapter (it
        leaves the running batch at the next step), try again."""
        while True:
            with self.turns.turn():
                try:
                    self.pipelines[adapter.model].unregister_lora(adapter.name)
                    break
                except RuntimeError:
                    pass
            time.sleep(retry_s)
        with self._lock:
            del self._adapters[adapter.name]
        log.info("LoRA %r unloaded from %s", adapter.name, adapter.model)
