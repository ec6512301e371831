"""Compile every kernel launch the served models make for real GPUs, on a CPU, and check each configuration
against the GPU's limits (`rfserve.kernels.limits`).

    python -m rfserve.benchmarks.compile_kernels [--subset] [--targets 90,80] [--dtypes bf16,fp16]

The interpreter runs Python semantics and knows nothing of registers or shared memory, so a kernel that passes
every CPU test can still fail to compile, spill, or not fit an SM. Here each launch is specialised as the JIT
would specialise it (dtypes, 16-divisibility of pointers and integers, integers equal to 1), compiled with
Triton's ahead-of-time path for sm_90 and sm_80 with each of its autotune configurations, and read back:
shared memory from the compiled metadata, registers and local memory from the bundled `cuobjdump -res-usage`.

A configuration that breaks a limit is reported as pruned: the autotuner drops it with the same rule
(`triton_autotune.fitting`). The check fails on a compile error, or on a launch that the dispatcher
would send to Triton with no configuration left. Launches the dispatcher routes to the twin
(`dispatch.triton_unsupported`) are listed and not compiled. Triton caches the cubins (TRITON_CACHE_DIR),
so only the first run pays for compilation. Run it without TRITON_INTERPRET: under the interpreter `triton.jit`
gives functions that cannot be compiled.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from rfserve.benchmarks.served_launches import ServedLaunch, served_launches
from rfserve.kernels import dispatch
from rfserve.kernels.launch import Launch
from rfserve.kernels.limits import KB, Usage, blocks_per_sm, limits_for, problems

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VELOCITY_OPS = ("cfg_euler", "janus_cfg_euler", "perflow")
LORA_OPS = ("lora_shrink", "lora_expand")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_config(launch: Launch, config, capability: int):
    """The CompiledKernel a launch with `config` gets on sm_`capability`: the JIT's own binder specialises the
    arguments, and its own packing turns that into the signature, constexprs and attributes it compiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, **config.all_kwargs()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def usage_of(compiled, num_warps: int) -> Usage:
    """Registers and local memory (stack frame + local; spills land in both) from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = RESOURCES.search(text)
    if match is None:
        raise RuntimeError(f"no resource line in cuobjdump output: {text[:200]!r}")
    registers, stack, local = map(int, match.groups())
    return Usage(registers, (stack + local) // 4, compiled.metadata.shared, num_warps)


@dataclass
class Row:
    """One (launch, dtype, target, configuration): its usage, or why it has none."""

    label: str
    dtype: str
    capability: int
    config: str
    tiles: dict = field(default_factory=dict)       # the config's meta-parameters (BLOCK_M, BLOCK_N, ...)
    usage: Usage | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"sm_{self.capability} {self.dtype:4} {self.label} [{self.config}]"
        if self.error:
            return f"FAIL   {head}: {self.error}"
        u = self.usage
        assert u is not None
        blocks = blocks_per_sm(limits_for(self.capability), registers=u.registers, shared=u.shared,
                               num_warps=u.num_warps)
        verdict = "pruned" if self.problems else "ok    "
        why = f" ({'; '.join(self.problems)})" if self.problems else ""
        return (f"{verdict} {head}: {u.registers} regs, {u.spills} spilled, {u.shared / KB:.0f} KB shared, "
                f"{blocks} blocks/SM{why}")


def config_name(config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def check(launches: list[ServedLaunch], capabilities: list[int], dtypes: list[str], log=print,
          found: dict[tuple[str, str, int], list[Row]] | None = None) -> dict:
    """Compile each distinct specialisation once (launches differing only in batch or an unspecialised
    integer compile to the same kernel) and return the counts of the summary. `found`, where given, gets
    every launch's rows by (label, dtype, capability), the shared ones included (`kernel_figures`)."""
    done: dict[tuple, list[Row]] = {}
    counts = {"launches": 0, "routed_to_twin": 0, "compiled": 0, "ok": 0, "pruned": 0, "errors": 0,
              "no_config_left": 0}
    for served in launches:
        for dtype in dtypes:
            launch = served.build(DTYPES[dtype])
            counts["launches"] += 1
            routed = dispatch.triton_unsupported(served.op, launch.constexprs.get("HEAD_DIM"))
            if routed:
                counts["routed_to_twin"] += 1
                continue
            for capability in capabilities:
                key = (launch.kernel, dtype, capability, _specialisation(launch))
                if key not in done:
                    done[key] = _compile_all(served, launch, dtype, capability, counts, log)
                if found is not None:
                    found[served.label, dtype, capability] = done[key]
    return counts


def _compile_all(served: ServedLaunch, launch: Launch, dtype: str, capability: int, counts: dict, log) -> list[Row]:
    rows = [_row(served, launch, dtype, capability, c) for c in launch.configs]
    for row in rows:
        log(row.line())
        counts["compiled"] += 1
        counts["errors"] += bool(row.error)
        counts["pruned"] += bool(row.problems)
        counts["ok"] += not row.error and not row.problems
    if not any(r.usage is not None and not r.problems for r in rows):
        counts["no_config_left"] += 1
        log(f"FAIL   sm_{capability} {dtype} {served.label}: no configuration fits")
    return rows


def _specialisation(launch: Launch) -> tuple:
    """What the JIT keys a compile on: constexprs, and per argument its type and 16-divisibility / == 1, except
    for the arguments the kernel marks `do_not_specialize` (lengths): launches that differ only there share
    one binary on the GPU, and are compiled once here."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fixed = set(launch.kernel.do_not_specialize)
    spec = tuple(native_specialize_impl(BaseBackend, a, False, name not in fixed and i not in fixed, True)
                 for i, (name, a) in enumerate(zip(launch.kernel.arg_names, launch.args)))
    return spec + tuple(sorted(launch.constexprs.items()))


def _row(served: ServedLaunch, launch: Launch, dtype: str, capability: int, config) -> Row:
    row = Row(served.label, dtype, capability, config_name(config), dict(config.kwargs))
    try:
        row.usage = usage_of(compile_config(launch, config, capability), config.num_warps)
    except Exception as exc:  # every compile error is a finding, reported with its configuration
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
        return row
    row.problems = problems(limits_for(capability), row.usage)
    return row


def representative(launches: list[ServedLaunch]) -> list[ServedLaunch]:
    """The quick check while working on a kernel (CI runs the full set): every kernel at the worst attention
    shapes (head dim 160, the largest the kernel serves; 88, which needs the alignment hint), every velocity
    variant (per-row guidance included) at one latent size per family, decode attention (head dim 128,
    the only one served) at one bucket over the paged cache: the slot layout and other buckets compile the
    same code with other integers; and LoRA at its widest binding (4 adapters) on contiguous and NCHW
    inputs, and one adapter on a no-token input."""
    worst = ("sd15-unet attention B1 H8 D160 Lq256 Lk256", "hunyuan-dit attention B2 H16 D88 Lq4096 Lk4096")
    decode = ("janus-pro-7b decode_attention B1 H32 Hkv32 D128 ctx16384 page16",
              "janus-pro-7b decode_combine B1 H32 Hkv32 D128 ctx16384 page16")
    lora = ("to_q R64 L4096 in320 out320 r64 K4", "proj_in R64 L4096 in320 out320 r64 K4 nchw",
            "linear R64 in1280 out1280 r64 K1")
    return [s for s in launches if s.label in worst + decode or (s.op in VELOCITY_OPS and (
        "(1, 4, 64, 64)" in s.shape or "(1, 4, 48, 48)" in s.shape)) or (s.op in LORA_OPS and s.shape in lora)]


def passed(counts: dict) -> bool:
    return counts["errors"] == 0 and counts["no_config_left"] == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="a representative subset (`representative`)")
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16", help=f"of {sorted(DTYPES)}, comma-separated")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.targets.split(",")]
    dtypes = args.dtypes.split(",")
    start = time.perf_counter()
    launches = served_launches()
    counts = check(representative(launches) if args.subset else launches, capabilities, dtypes)
    counts["seconds"] = round(time.perf_counter() - start, 1)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + (" PASS" if passed(counts) else " FAIL"))
    return 0 if passed(counts) else 1


if __name__ == "__main__":
    sys.exit(main())
