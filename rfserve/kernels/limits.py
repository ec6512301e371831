"""Per-SM resource limits of the GPUs we compile for, and the occupancy they allow.

One source of truth: the compile check (`rfserve.benchmarks.compile_kernels`) fails a configuration with these
numbers, and the attention autotuner prunes with them before it benchmarks anything, so a configuration the
check would fail is never tried on a device.
"""
from __future__ import annotations

from dataclasses import dataclass

KB = 1024


@dataclass(frozen=True)
class GpuLimits:
    name: str
    capability: int             # 90 for sm_90
    shared_per_block: int       # bytes a block may opt in to
    shared_per_sm: int          # bytes per SM; each resident block also holds `reserved_per_block`
    reserved_per_block: int = 1 * KB
    registers_per_sm: int = 64 * KB
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    register_granule: int = 256  # registers are allocated per warp in units of this many
    max_registers_per_thread: int = 255


LIMITS = {
    90: GpuLimits("H100 (sm_90)", 90, shared_per_block=227 * KB, shared_per_sm=228 * KB),
    80: GpuLimits("A100 (sm_80)", 80, shared_per_block=163 * KB, shared_per_sm=164 * KB),
}


def blocks_per_sm(limits: GpuLimits, *, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM for a kernel using `registers` per thread and `shared` bytes per block;
    0 where one block cannot be resident (the launch fails with "out of resources")."""
    if shared > limits.shared_per_block or registers > limits.max_registers_per_thread:
        return 0
    per_warp = -(-registers * 32 // limits.register_granule) * limits.register_granule
    by_registers = (limits.registers_per_sm // max(per_warp, 1)) // num_warps
    by_shared = limits.shared_per_sm // (shared + limits.reserved_per_block)
    by_threads = limits.threads_per_sm // (num_warps * 32)
    return min(by_registers, by_shared, by_threads, limits.blocks_per_sm)


@dataclass(frozen=True)
class Usage:
    """What one compiled configuration asks of an SM: registers per thread, spilled registers per thread
    (local memory / 4, as Triton's driver counts them), dynamic shared memory per block, warps per block."""

    registers: int
    spills: int
    shared: int
    num_warps: int


def limits_for(capability: int) -> GpuLimits:
    """The limits of `capability`, else of the nearest older one we know (sm_89 and sm_86 get A100's, which
    is generous on shared memory: there Triton's own out-of-resources check drops what still does not fit)."""
    known = [c for c in LIMITS if c <= capability]
    if not known:
        raise ValueError(f"no resource limits known for sm_{capability} or older; known: {sorted(LIMITS)}")
    return LIMITS[max(known)]


def problems(limits: GpuLimits, usage: Usage) -> list[str]:
    """Why a configuration must not run on this GPU; empty when it may. A spill is a failure, not a cost: the
    kernels are sized to keep the tile in registers, and a spilling tile runs at local-memory speed."""
    found = []
    if usage.spills:
        found.append(f"spills {usage.spills} registers")
    if usage.shared > limits.shared_per_block:
        found.append(f"shared {usage.shared // KB} KB > {limits.shared_per_block // KB} KB")
    if blocks_per_sm(limits, registers=usage.registers, shared=usage.shared, num_warps=usage.num_warps) < 1:
        found.append("no block fits an SM")
    return found
