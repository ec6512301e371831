"""Compile-time figures for every served attention shape: what the compiled kernel asks of an SM, and how much of
its tensor-core work lands on real elements. Not measurements on a device: no GPU has run these kernels, and the
autotuner's pick among the configurations that fit is made on the device, so each figure is the range over them.

    python -m rfserve.benchmarks.kernel_figures [--targets 90,80] [--dtypes bf16] > benchmarks/results/kernel_figures.md

Per shape (batch left out: it changes the grid, not the tile): GFLOP per launch at batch 1 (4·H·Lq·Lk·D, the two
matrix products), and per target the configurations that fit of those tried, shared memory and resident blocks
per SM, and the tile efficiency: the head dim over its padded chunks, times each length over its whole tiles.
Built on the compile check (`compile_kernels.check`), whose Triton cache it shares.
"""
from __future__ import annotations

import argparse
import math
import re
import sys

from rfserve.benchmarks.compile_kernels import DTYPES, Row, check
from rfserve.benchmarks.served_launches import ServedLaunch, served_launches
from rfserve.kernels.limits import KB, blocks_per_sm, limits_for


def tile_efficiency(head_dim: int, padded: int, lq: int, lk: int, tiles: dict) -> float:
    """The share of a launch's tile work on real elements: D / padded D, and L / (whole tiles · tile) per length."""
    def whole(n: int, tile: int) -> int:
        return math.ceil(n / tile) * tile
    return head_dim / padded * lq / whole(lq, tiles["BLOCK_M"]) * lk / whole(lk, tiles["BLOCK_N"])


def shape_of(served: ServedLaunch) -> tuple[str, int, int, int, int]:
    """(model, H, D, Lq, Lk) from the launch's label ("B2 H16 D88 Lq4096 Lk333"), batch left out."""
    f = {name: int(value) for name, value in re.findall(r"(Lq|Lk|H|D)(\d+)", served.shape)}
    return served.model, f["H"], f["D"], f["Lq"], f["Lk"]


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def table(launches: list[ServedLaunch], found: dict[tuple[str, str, int], list[Row]], capabilities: list[int],
          dtype: str) -> list[str]:
    """One markdown row per (model, H, D, Lq, Lk) and target; shapes SDPA serves by rule say so."""
    lines = ["| model | H | D | Lq | Lk | GFLOP (B=1) | target | fit | shared KB | blocks/SM | tile efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for served in launches:
        model, H, D, lq, lk = shape_of(served)
        if (model, H, D, lq, lk) in seen:
            continue
        seen.add((model, H, D, lq, lk))
        launch = served.build(DTYPES[dtype])
        gflop = 4 * H * lq * lk * D / 1e9
        head = f"| {model} | {H} | {D} | {lq} | {lk} | {gflop:.2f}"
        if (served.label, dtype, capabilities[0]) not in found:
            lines.append(f"{head} | all | SDPA by rule (`dispatch.triton_unsupported`) | | | |")
            continue
        padded = launch.constexprs["CHUNK0"] + launch.constexprs["CHUNK1"]
        for capability in capabilities:
            rows = found[served.label, dtype, capability]
            fit = [r for r in rows if r.usage is not None and not r.problems and not r.error]
            limits = limits_for(capability)
            blocks = [blocks_per_sm(limits, registers=r.usage.registers, shared=r.usage.shared,
                                    num_warps=r.usage.num_warps) for r in fit if r.usage is not None]
            shared = [r.usage.shared / KB for r in fit if r.usage is not None]
            efficiency = [tile_efficiency(D, padded, lq, lk, r.tiles) for r in fit]
            lines.append(f"{head} | sm_{capability} | {len(fit)}/{len(rows)} | {_range(shared, '.0f')} | "
                         f"{_range(blocks, 'd')} | {_range(efficiency, '.0%')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default="bf16", help=f"of {sorted(DTYPES)}, comma-separated")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.targets.split(",")]
    launches = [s for s in served_launches() if s.op == "attention"]
    for dtype in args.dtypes.split(","):
        found: dict[tuple[str, str, int], list[Row]] = {}
        counts = check(launches, capabilities, [dtype], log=lambda line: None, found=found)
        print(f"### {dtype}\n")
        print("\n".join(table(launches, found, capabilities, dtype)))
        print(f"\n{counts['compiled']} configurations compiled, {counts['errors']} errors, "
              f"{counts['no_config_left']} shapes with no configuration left.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
