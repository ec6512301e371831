"""The compile-time figures' arithmetic, on rows made by hand (the compiles themselves: test_kernel_compile.py)."""
import pytest

from rfserve.benchmarks.compile_kernels import Row
from rfserve.benchmarks.kernel_figures import shape_of, table, tile_efficiency
from rfserve.benchmarks.served_launches import served_launches
from rfserve.kernels.limits import KB, Usage


def test_tile_efficiency_counts_padded_chunks_and_partial_tiles():
    assert tile_efficiency(80, 80, 4096, 4096, {"BLOCK_M": 128, "BLOCK_N": 64}) == 1.0
    assert tile_efficiency(88, 96, 77, 77, {"BLOCK_M": 64, "BLOCK_N": 32}) == pytest.approx(
        88 / 96 * 77 / 128 * 77 / 96)


def test_one_row_per_shape_and_target_with_ranges_over_what_fits():
    served = [s for s in served_launches(buckets=(1, 2)) if s.label.startswith("hunyuan-dit attention")]
    first = served[0]
    assert shape_of(first)[1:3] == (16, 88)
    fits = Row(first.label, "bf16", 90, "a", {"BLOCK_M": 64, "BLOCK_N": 32}, Usage(128, 0, 40 * KB, 4))
    other = Row(first.label, "bf16", 90, "b", {"BLOCK_M": 128, "BLOCK_N": 64}, Usage(200, 0, 80 * KB, 8))
    spills = Row(first.label, "bf16", 90, "c", {"BLOCK_M": 128, "BLOCK_N": 128}, Usage(255, 9, 90 * KB, 8),
                 problems=["spills 9 registers"])
    found = {(s.label, "bf16", 90): [fits, other, spills] for s in served}
    lines = table(served, found, [90], "bf16")
    shapes = {shape_of(s) for s in served}
    assert len(lines) == 2 + len(shapes)                          # the batch buckets share a row
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[7:11] == ["sm_90", "2/3", "40-80", "1-4"]        # 4 by registers and warps; 1 at 200 regs × 8 warps

