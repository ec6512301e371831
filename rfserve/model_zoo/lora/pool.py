"""One model component's adapter pool: its LoRA layers wrapped once, adapters swapped into device slots (LRU).

Adapters live on the host once registered; `ensure` copies those a batch needs into free device slots, evicting
the least recently used adapter no running row has pinned. Every wrapped layer holds `slots + 1` stacked A/B
(slot 0 all zeros, "no adapter") allocated at setup, and all layers read the rows' slot ids and scales from one
shared `RowBinding`, which `bind` overwrites in place before each forward. So the wrapped model's forward takes
the same arguments as before and a compiled graph (or a CUDA graph) serves every mix of adapters.

Per step the pipeline calls, for the forward's rows (laid out by `samplers.with_uncond`):
    slots, scales = pool.rows(choices)                      # per request row: [(name, scale), ...]
    pool.bind(with_uncond(slots, cfg), with_uncond(scales, cfg))
and pins a request's slots (`pin`/`unpin`) from its first step to its last, so no other batch evicts them.

What the slots cost is fixed at setup, so the memory plan counts it from the model's shapes alone (`slot_bytes`,
from the same shapes the pool allocates) for the binding's rows that `lora_rows` gives.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rfserve.model_zoo.lora.files import LoraFile
from rfserve.model_zoo.lora.layers import MultiLoRA, RowBinding, in_out, stack_shapes

# The layers diffusers' and kohya's SD LoRAs train, by module-path suffix.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")     # Hunyuan-DiT's blocks
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS, "transformer": TRANSFORMER_TARGETS}


class PoolFull(RuntimeError):
    """Every slot holds an adapter that a running row pinned or this batch needs: the batch must wait."""


@dataclass(frozen=True)
class PoolConfig:
    slots: int = 8                    # device slots for adapters, besides the zero slot
    max_rank: int = 64                # every slot's rank; lower-rank adapters are zero-padded
    max_rows: int = 64                # the most rows one forward may have: `lora_rows`
    per_row: int = 2                  # K: adapters one row may combine
    targets: tuple[str, ...] | None = None     # module-path suffixes to wrap; None: the component's `TARGETS`

    def wrapping(self, component: str) -> tuple[str, ...]:
        return self.targets if self.targets is not None else TARGETS[component]


class AdapterPool:
    """Wraps `model`'s target layers in place (after the model is on its device and dtype) and owns its slots."""

    def __init__(self, model: nn.Module, component: str, config: PoolConfig):
        self.component, self.config = component, config
        self.binding = _binding(config, next(model.parameters()).device)
        self._shapes = {name: in_out(m) for name, m in _targets(model, config.wrapping(component)).items()}
        self._model_modules = {name for name, _ in model.named_modules()}
        self.layers: dict[str, MultiLoRA] = {}
        for name in self._shapes:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            layer = MultiLoRA(getattr(owner, child), self.binding, config.slots, config.max_rank)
            setattr(owner, child, layer)
            self.layers[name] = layer
        self._host: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()      # name -> slot, least recently used first
        self._pins: Counter[int] = Counter()

    def register(self, name: str, lora: LoraFile) -> None:
        """Keep an adapter's layers for this component on the host, scale folded into B. An adapter with no layer
        here is registered too (its rows use the zero slot). ValueError naming the file for a target this
        component lacks or does not wrap, a shape that does not fit, or a rank above the pool's."""
        if name in self._host:
            raise ValueError(f"adapter {name!r} is already registered")
        if lora.rank > self.config.max_rank:
            raise ValueError(f"{lora.source}: rank {lora.rank} is above the pool's max rank {self.config.max_rank}")
        layers = {}
        for module, w in lora.components.get(self.component, {}).items():
            target = self._resolve(lora.source, module)
            fan_in, fan_out = self._shapes[target]
            if w.a.shape[1] != fan_in or w.b.shape[0] != fan_out:
                raise ValueError(f"{lora.source}: {self.component}.{module} is {fan_in}->{fan_out}, the LoRA "
                                 f"gives A {tuple(w.a.shape)} and B {tuple(w.b.shape)}")
            layers[target] = (w.a.contiguous(), (w.b * w.scale).contiguous())
        self._host[name] = layers

    def _resolve(self, source: str, module: str) -> str:
        # CLIPTextModel lost its `text_model.` level in transformers 5; older files still name it (as in diffusers).
        for candidate in (module, module.removeprefix("text_model.")):
            if candidate in self._shapes:
                return candidate
        if module in self._model_modules or module.removeprefix("text_model.") in self._model_modules:
            raise ValueError(f"{source}: {self.component}.{module} is not a layer this pool serves "
                             f"(it wraps {', '.join(self.config.wrapping(self.component))})")
        raise ValueError(f"{source}: the {self.component} has no module {module!r}")

    def unregister(self, name: str) -> None:
        """Forget an adapter; a RuntimeError while a running row has its slot pinned."""
        slot = self._resident.get(name)
        if slot is not None and self._pins[slot]:
            raise RuntimeError(f"adapter {name!r} is in use by a running row")
        self._resident.pop(name, None)
        del self._host[name]

    def ensure(self, names: Sequence[str]) -> list[int]:
        """The device slot of each adapter, copying in those not resident (evicting least recently used,
        unpinned adapters that this call does not need); slot 0 for an adapter with no layer here."""
        unknown = [n for n in names if n not in self._host]
        if unknown:
            raise KeyError(f"no adapter registered as {unknown[0]!r}")
        slots = []
        for name in names:
            if not self._host[name]:
                slots.append(0)
                continue
            if name not in self._resident:
                self._load(name, self._free_slot(keep=set(names)))
            self._resident.move_to_end(name)
            slots.append(self._resident[name])
        return slots

    def _free_slot(self, keep: set[str]) -> int:
        used = set(self._resident.values())
        free = [s for s in range(1, self.config.slots + 1) if s not in used]
        if free:
            return free[0]
        for name, slot in self._resident.items():
            if not self._pins[slot] and name not in keep:
                del self._resident[name]
                return slot
        raise PoolFull(f"all {self.config.slots} {self.component} LoRA slots are pinned or needed by this batch")

    def _load(self, name: str, slot: int) -> None:
        weights = self._host[name]
        for target, layer in self.layers.items():
            a, b = weights.get(target, (None, None))
            layer.load_slot(slot, a, b)
        self._resident[name] = slot

    def resident(self) -> dict[str, int]:
        return dict(self._resident)

    def pin(self, slots: Sequence[int]) -> None:
        """Keep these slots' adapters resident until `unpin`; counted, so rows sharing an adapter pin it each."""
        self._pins.update(s for s in slots if s)

    def unpin(self, slots: Sequence[int]) -> None:
        self._pins.subtract(s for s in slots if s)

    def rows(self, choices: Sequence[Sequence[tuple[str, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids (R, K) and scales (R, K) on the host for rows choosing [(adapter, scale), ...] each (up to K;
        unused columns take the zero slot), with the adapters made resident."""
        k = self.config.per_row
        too_many = [c for c in choices if len(c) > k]
        if too_many:
            raise ValueError(f"a row combines {len(too_many[0])} adapters, the pool allows {k}")
        slots = torch.zeros(len(choices), k, dtype=torch.long)
        scales = torch.zeros(len(choices), k)
        names = list(dict.fromkeys(n for c in choices for n, _ in c))
        resident = dict(zip(names, self.ensure(names)))
        for i, choice in enumerate(choices):
            for j, (name, scale) in enumerate(choice):
                slots[i, j], scales[i, j] = resident[name], scale
        return slots, scales

    def bind(self, slots: torch.Tensor, scales: torch.Tensor) -> None:
        """Write the forward's rows' slot ids and scales (R, K) into the shared binding; rows past R keep what
        they held, which only a padded bucket's discarded rows read."""
        rows = slots.shape[0]
        if rows > self.config.max_rows or tuple(scales.shape) != tuple(slots.shape):
            raise ValueError(f"bind takes slots and scales (R, {self.config.per_row}) with R <= "
                             f"{self.config.max_rows}, got {tuple(slots.shape)} and {tuple(scales.shape)}")
        self.binding.slots[:rows].copy_(slots, non_blocking=True)
        self.binding.scales[:rows].copy_(scales, non_blocking=True)
        used = (slots != 0).any(0).nonzero()                                # the host's copy: no device sync
        self.binding.width = int(used.max()) + 1 if len(used) else 0


def lora_rows(max_batch: int, cfg: bool, buckets: Sequence[int] = ()) -> int:
    """The rows a pool's binding must hold (`PoolConfig.max_rows`): those of the largest denoiser forward. A batch
    of at most `max_batch` images gives each guided row an unconditional copy (`cfg`: whether any row may use
    guidance), and the fast path runs a forward between two captured ones padded to the larger (`Captured.padded`),
    so the largest captured batch bucket counts too (the engine captures none above `max_batch`)."""
    return (2 if cfg else 1) * max((max_batch, *buckets))


def slot_bytes(model: nn.Module, component: str, config: PoolConfig) -> int:
    """The bytes an `AdapterPool` with `config` allocates on `model` (the `component`), from its shapes alone (a
    model built on the meta device will do): each targeted layer's A and B stacks at its weight's dtype,
    (slots + 1)·max_rank·(in + out) elements, and the rows' binding, which its layers share."""
    stacks = sum(math.prod(shape) * layer.weight.element_size()
                 for layer in _targets(model, config.wrapping(component)).values()
                 for shape in stack_shapes(*in_out(layer), config.slots, config.max_rank))
    binding = _binding(config, torch.device("meta"))
    return stacks + binding.slots.nbytes + binding.scales.nbytes


def _binding(config: PoolConfig, device: torch.device) -> RowBinding:
    return RowBinding(torch.zeros(config.max_rows, config.per_row, dtype=torch.long, device=device),
                      torch.zeros(config.max_rows, config.per_row, dtype=torch.float32, device=device))


def _targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The layers a pool wraps: those whose module path ends in one of `targets`."""
    return {name: m for name, m in model.named_modules()
            if any(name == t or name.endswith(f".{t}") for t in targets)}
