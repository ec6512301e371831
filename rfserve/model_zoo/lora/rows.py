"""A step-level pipeline's adapters (issue #34): the denoiser's pool and the text encoder's, the rows' choices kept
in a running batch (pinned from a row's `begin` to its leaving), and text encoded with each row's adapters.

Per row an `ImageSpec.lora` is ((name, scale), ...), combined as diffusers' `set_adapters(names, scales)` does on
every component the adapters touch: the denoiser's forward binds each row's slots and scales (laid out with
`samplers.with_uncond`, so a guided row's unconditional copy uses its row's adapters, as diffusers does with an
adapter loaded), and a row whose adapters touch the text encoder has its prompts encoded with them bound, cached
apart from the plain prompts under a key naming the adapters (with the registration each name had) and scales.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Callable, Hashable, Sequence

import torch
from torch import nn

from rfserve.model_zoo.lora.files import LoraFile
from rfserve.model_zoo.lora.pool import AdapterPool, PoolConfig
from rfserve.model_zoo.samplers import with_uncond

Choice = tuple[tuple[str, float], ...]


class LoraRows:
    """A `running.RowState`: each row's adapter choice and the denoiser slots it pinned; a row that leaves
    (`Running.keep`/`leave` drop it) unpins them, so an adapter stays resident exactly while a row uses it. `take`
    and `join` hand the kept rows' pins on to the state they return; a state dropped with rows still in it (a batch
    abandoned on an error) unpins them when it is collected."""

    def __init__(self, pool: AdapterPool, choices: list[Choice], slots: list[list[int]]):
        self.pool, self.choices, self.slots = pool, choices, slots

    def __len__(self) -> int:
        return len(self.choices)

    def _handed_on(self) -> None:
        self.slots = []

    def take(self, rows: list[int]) -> "LoraRows":
        kept = set(rows)
        for i, slots in enumerate(self.slots):
            if i not in kept:
                self.pool.unpin(slots)
        out = LoraRows(self.pool, [self.choices[i] for i in rows], [self.slots[i] for i in rows])
        self._handed_on()
        return out

    def join(self, other: "LoraRows") -> "LoraRows":
        out = LoraRows(self.pool, self.choices + other.choices, self.slots + other.slots)
        self._handed_on()
        other._handed_on()
        return out

    def release(self) -> None:
        """Unpin every row's slots (the rows are gone)."""
        for slots in self.slots:
            self.pool.unpin(slots)
        self._handed_on()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 — at interpreter exit the pool may already be gone
            pass


class PipelineAdapters:
    """The pools of one pipeline: `denoiser` wraps the UNet's (`component` "unet") or a transformer's layers,
    `text` the text encoder's (None without one). Create it after the model is on its device and dtype, and
    before the fast path is prepared (the compiled graphs then read the pools' slots and bindings in place)."""

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None, config: PoolConfig,
                 text_config: PoolConfig | None = None, component: str = "unet"):
        self.component = component
        self.denoiser = AdapterPool(denoiser, component, config)
        self.text = None
        if text_encoder is not None:
            self.text = AdapterPool(text_encoder, "text_encoder", text_config or replace(config, targets=None))
        self._registration: dict[str, int] = {}        # name -> which registration (a text-cache key part)
        self._touches_text: set[str] = set()
        self._counter = itertools.count()

    def names(self) -> list[str]:
        return list(self._registration)

    def register(self, name: str, lora: LoraFile) -> None:
        """ValueError (naming the file) for components this pipeline lacks, or what the pools reject."""
        if name in self._registration:
            raise ValueError(f"adapter {name!r} is already registered")
        served = {self.component} | ({"text_encoder"} if self.text is not None else set())
        other = sorted(set(lora.components) - served)
        if other:
            raise ValueError(f"{lora.source}: has layers for the {', '.join(other)}, which this model lacks "
                             f"(it has {', '.join(sorted(served))})")
        self.denoiser.register(name, lora)
        if self.text is not None:
            try:
                self.text.register(name, lora)
            except Exception:
                self.denoiser.unregister(name)
                raise
        self._registration[name] = next(self._counter)
        if "text_encoder" in lora.components:
            self._touches_text.add(name)

    def unregister(self, name: str) -> None:
        """KeyError for an unknown name; RuntimeError while a running row uses it."""
        if name not in self._registration:
            raise KeyError(f"no adapter registered as {name!r}")
        self.denoiser.unregister(name)
        if self.text is not None:
            self.text.unregister(name)
        del self._registration[name]
        self._touches_text.discard(name)

    def check(self, choices: Sequence[Choice]) -> None:
        """KeyError for an unknown adapter, ValueError for a row naming one twice or more than the pool's K."""
        for choice in choices:
            for name, _ in choice:
                if name not in self._registration:
                    raise KeyError(f"no adapter registered as {name!r}")
            if len({n for n, _ in choice}) != len(choice):
                raise ValueError(f"a row names an adapter twice: {choice}")
            if len(choice) > self.denoiser.config.per_row:
                raise ValueError(f"a row combines {len(choice)} adapters, the pool allows "
                                 f"{self.denoiser.config.per_row}")

    def pinned(self, choices: list[Choice]) -> LoraRows:
        """The rows' choices (as `check` passed them), their denoiser adapters made resident together and pinned
        per row (PoolFull when the free slots cannot hold them: the rows must wait)."""
        slots, _ = self.denoiser.rows(choices)
        per_row = [[s for s in row.tolist() if s] for row in slots]
        for row in per_row:
            self.denoiser.pin(row)
        return LoraRows(self.denoiser, list(choices), per_row)

    def bind(self, rows: LoraRows, cfg: list[int]) -> None:
        """Before the denoiser's forward: each forward row's slots and scales, laid out as `with_uncond`."""
        slots, scales = self.denoiser.rows(rows.choices)
        self.denoiser.bind(with_uncond(slots, cfg), with_uncond(scales, cfg))

    def text_variant(self, choice: Choice) -> Hashable:
        """The text-cache key part of a row's choice: None where no adapter of it touches the text encoder."""
        touching = tuple((name, self._registration[name], float(scale))
                         for name, scale in choice if name in self._touches_text)
        return touching or None

    def text_choice(self, choice: Choice) -> Choice:
        return tuple((name, scale) for name, scale in choice if name in self._touches_text)

    def encoder(self, encode: Callable[[list[str]], tuple[torch.Tensor, list[bool]]], choice: Choice = ()
                ) -> Callable[[list[str]], tuple[torch.Tensor, list[bool]]]:
        """`encode` run with the text encoder's rows bound to `choice` (every prompt alike; () binds none), in
        chunks of the text pool's max rows."""
        if self.text is None:
            return encode
        pool = self.text

        def run(prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
            embs, flags = [], []
            for at in range(0, len(prompts), pool.config.max_rows):
                chunk = prompts[at:at + pool.config.max_rows]
                pool.bind(*pool.rows([choice] * len(chunk)))
                emb, truncated = encode(chunk)
                embs.append(emb)
                flags += truncated
            return torch.cat(embs), flags

        return run
