"""How much KV each chat model gets at start: the memory budget, less what loading and warm-up used, shared
among the chat models as `rfserve plan` shares it (`model_zoo.memory_plan.share_kv`).

The budget is the device's memory (`--device-memory` where given: a GPU shared with another process, a
container's limit) × `--gpu-memory-utilization`. What is used is measured after every image model has run its
largest warm-up batch, not planned:
- on CUDA, the allocator's peak since start: the weights, the largest batch at `--max-batch` at every size
  (warm-up tunes each), captured graphs' pools;
- on the CPU, the process's resident memory: the weights, the activations the allocator keeps, the libraries.
  The host has no device allocator to ask, and the resident set is what competes with the KV for RAM. The
  CPU's total is the container's cgroup limit where one is set below the host's RAM.
The remaining `utilization` margin covers what neither sees (cuBLAS workspaces, the chat step's own graphs).
A chat model never gets more than every sequence at full length (`max_seqs × max_len`) nor less than one
sequence at full length: a budget below that fails the start with one line that says what to change.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rfserve.model_zoo.loading import describe
from rfserve.model_zoo.memory_plan import ModelPlan, plan_memory, share_kv
from rfserve.model_zoo.memory_units import GiB
from rfserve.model_zoo.paged_kv import PAGE, blocks_for
from rfserve.model_zoo.presets import ModelSpec
from rfserve.server.config import ServerConfig

log = logging.getLogger("rfserve.memory")
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))   # v2, v1


@dataclass(frozen=True)
class ChatNeed:
    """One chat model's KV as the budget sees it."""
    name: str
    bytes_per_token: int
    max_len: int


class KVBudgetTooSmall(RuntimeError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def device_total(device: torch.device, device_memory: int | None) -> int:
    """The memory to plan with: `--device-memory`, else the device's (on the CPU, the host's, see `host_memory`)."""
    if device_memory:
        return device_memory
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return host_memory()


def host_memory() -> int:
    """The host's RAM, or a container's memory limit where its cgroup sets a lower one: a pod's limit is what the
    kernel's OOM killer enforces, whatever RAM the node has."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():                  # "max" (v2) or a huge v1 figure: no lower limit
            total = min(total, int(text))
    return total


def used_bytes(device: torch.device) -> int:
    """What the process holds now that warm-up ran (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chat_blocks(needs: list[ChatNeed], free: int, max_seqs: int) -> dict[str, int]:
    """Each chat model's pool in blocks, the null block included, from `free` bytes."""
    plans = [ModelPlan(n.name, "chat", 0, 0, kv_bytes_per_token=n.bytes_per_token, context=n.max_len) for n in needs]
    share_kv(plans, max(0, free), max_seqs)
    out = {}
    for need, plan in zip(needs, plans):
        blocks = min(plan.kv_tokens // PAGE, max_seqs * blocks_for(need.max_len))
        if blocks < blocks_for(need.max_len):
            raise KVBudgetTooSmall(need.name,
                f"{free / GiB:.2f} GiB is left for chat KV after the weights and warm-up, less than one "
                f"sequence of {need.max_len:,} tokens needs ({need.max_len * need.bytes_per_token / GiB:.2f} GiB); "
                f"lower --chat-max-len or --max-batch, or raise --gpu-memory-utilization")
        out[need.name] = blocks + 1
    return out


def size_chat_kv(needs: list[ChatNeed], device: torch.device, device_memory: int | None, utilization: float,
                 max_seqs: int) -> dict[str, int]:
    """`chat_blocks` from the budget left now, logged as the plan's table is."""
    budget, used = int(device_total(device, device_memory) * utilization), used_bytes(device)
    blocks = chat_blocks(needs, budget - used, max_seqs)
    for need in needs:
        tokens = (blocks[need.name] - 1) * PAGE
        log.info("%s: chat KV %s tokens in %d blocks (%.2f GiB); budget %.2f GiB, in use after warm-up %.2f GiB",
                 need.name, f"{tokens:,}", blocks[need.name], tokens * need.bytes_per_token / GiB, budget / GiB,
                 used / GiB)
    return blocks


def log_plan(specs: list[ModelSpec], device: torch.device, dtype: torch.dtype, config: ServerConfig) -> None:
    """Log the plan `rfserve plan` prints for these models on this device, from their configurations: what to
    expect before warm-up measures what is really used (`size_chat_kv`)."""
    try:
        plan = plan_memory(specs, device_memory=device_total(device, config.device_memory),
                           utilization=config.gpu_memory_utilization, max_batch=config.max_batch, dtype=dtype,
                           max_seqs=config.chat.slots_on(device.type), max_len=config.chat.max_len,
                           lora=config.lora.pool(config.max_batch) if config.lora.on else None)
    except Exception as err:  # noqa: BLE001 — the plan informs; loading and warm-up measure
        log.warning("no memory plan: %s", describe(err))
        return
    log.info("memory plan on %s:\n%s", device, plan.table())
