"""A model layer that adds each row's own LoRA update to the base projection, computed once for the batch.

`MultiLoRA` wraps an nn.Linear or a 1×1 nn.Conv2d (SD1.5's proj_in/proj_out) in place. Its A and B stacks are
allocated once, at setup, at static addresses (a CUDA graph reads them where they are), and the pool copies an
adapter's matrices into a slot when it becomes resident. Which slots and scales each row uses lives in one
`RowBinding` that every layer of a component shares: the pool writes it before a forward, each layer reads its
first R rows (R = its input's batch), so the forward's arguments and the compiled graph never change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rfserve.kernels.lora import lora_delta


@dataclass
class RowBinding:
    """The rows' adapter choices, written by `AdapterPool.bind`: slot ids (max_rows, K) and scales (max_rows, K).
    Plain attributes of each layer rather than buffers, so that moving the model cannot split one binding into
    per-layer copies. `width`: the columns the bound rows use (0 when none has an adapter here). An eager forward
    computes only those (most rows use one adapter of K, and a batch without adapters costs nothing); a compiled
    graph reads all K, so that no binding changes its shapes."""

    slots: torch.Tensor
    scales: torch.Tensor
    width: int = 0


def in_out(layer: nn.Module) -> tuple[int, int]:
    """The (in, out) features of a layer a LoRA may target; a ValueError for any other layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1) \
            and layer.padding == (0, 0) and layer.groups == 1:
        return layer.in_channels, layer.out_channels
    raise ValueError(f"a LoRA layer must be nn.Linear or a plain 1x1 nn.Conv2d, got {layer}")


def stack_shapes(in_features: int, out_features: int, slots: int, max_rank: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of a layer's A stack (slots + 1, max_rank, in) and B stack (slots + 1, out, max_rank), the zero
    slot included: what `MultiLoRA` allocates, and what the memory plan counts (`pool.slot_bytes`)."""
    return (slots + 1, max_rank, in_features), (slots + 1, out_features, max_rank)


class MultiLoRA(nn.Module):
    """base(x) + the rows' low-rank updates. Slot 0 stays zero: the "no adapter" slot."""

    def __init__(self, base: nn.Module, binding: RowBinding, slots: int, max_rank: int):
        super().__init__()
        self.in_features, self.out_features = in_out(base)
        self.base = base
        self.binding = binding
        a, b = stack_shapes(self.in_features, self.out_features, slots, max_rank)
        # Not persistent: the model's own state dict (and its checkpoint) stay those of the base model.
        self.register_buffer("lora_a", base.weight.new_zeros(a), persistent=False)
        self.register_buffer("lora_b", base.weight.new_zeros(b), persistent=False)

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A (r, in) and B (out, r) into `slot`, zero-padded to the max rank (zero rows of A
        and columns of B add exact zeros); None clears the slot for an adapter that does not target this layer."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a)
            self.lora_b[slot, :, :r].copy_(b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        rows, k = x.shape[0], self.binding.slots.shape[1] if torch.compiler.is_compiling() else self.binding.width
        if k == 0:
            return y
        slots, scales = self.binding.slots[:rows, :k], self.binding.scales[:rows, :k]
        if isinstance(self.base, nn.Conv2d):
            h = x.flatten(2).transpose(1, 2)                                   # (R, C, H, W) -> (R, H·W, C)
            delta = lora_delta(h, self.lora_a, self.lora_b, slots, scales)     # (R, H·W, out)
            return y + delta.transpose(1, 2).reshape(y.shape)                  # -> (R, out, H, W)
        if x.ndim > 3:
            raise ValueError(f"a LoRA linear layer takes (R, in) or (R, L, in), got {tuple(x.shape)}")
        return y + lora_delta(x, self.lora_a, self.lora_b, slots, scales)
