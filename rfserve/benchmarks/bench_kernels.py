"""Kernel microbenchmarks: our attention against SDPA's backends, the velocity kernels against a copy, the
per-row LoRA kernels against their torch twin.

On CUDA: the served shapes, CUDA events, median after warm-up; TFLOP/s, the ratio to the best SDPA
backend, % of a bf16 matmul peak measured in the same run, and what the dispatcher picked.
On CPU: tiny shapes so the script runs end to end; the Triton column is the interpreter, a
correctness path whose times say nothing about a GPU.

    python -m rfserve.benchmarks.bench_kernels [--out benchmarks/out/] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rfserve.benchmarks.timing import median_ms

# (name, B, H, Lq, Lk, D, causal): anchors.md's table, SD cross-attention, Hunyuan-DiT, JanusFlow.
GPU_ATTENTION = [
    ("SD1.5 512² level 1 self", 16, 8, 4096, 4096, 40, False),
    ("SD1.5 512² level 1 cross", 16, 8, 4096, 77, 40, False),
    ("SD1.5 512² level 2 self", 16, 8, 1024, 1024, 80, False),
    ("SD1.5 512² level 2 cross", 16, 8, 1024, 77, 80, False),
    ("SD1.5 512² level 3 self", 16, 8, 256, 256, 160, False),
    ("d64 reference", 16, 8, 4096, 4096, 64, False),
    ("Hunyuan-DiT 1024² CFG self", 2, 16, 4096, 4096, 88, False),
    ("Hunyuan-DiT 1024² CFG cross (CLIP+T5)", 2, 16, 4096, 333, 88, False),
    ("JanusFlow gen CFG prefill", 2, 16, 640, 640, 128, True),
    ("JanusFlow chat prefill bs8", 8, 16, 1024, 1024, 128, True),
]
CPU_ATTENTION = [
    ("tiny self d40", 1, 2, 64, 64, 40, False),
    ("tiny cross d80 Lk77", 1, 2, 64, 77, 80, False),
    ("tiny self d88", 1, 2, 64, 64, 88, False),
    ("tiny causal d128", 1, 2, 64, 64, 128, True),
]
# (name, latent shape of x); the model output is (2B, ...).
GPU_VELOCITY = [("SD1.5 512² bs16", (16, 4, 64, 64)), ("Hunyuan-DiT 1024² bs1", (1, 4, 128, 128)),
                ("SDXL 1024² bs8", (8, 4, 128, 128))]
CPU_VELOCITY = [("tiny bs2", (2, 4, 16, 16))]
# (name, rows, tokens (0: an (R, in) input), in, out, adapters per row): SD1.5 UNet adapter layers at 512², rows
# as a guided batch of 16 runs them, rank 64 (the pool's max_rank).
GPU_LORA = [("SD1.5 level 0 to_q", 32, 4096, 320, 320, 2), ("SD1.5 level 0 to_k (CLIP)", 32, 77, 768, 320, 2),
            ("SD1.5 level 2 ff.net.0.proj", 32, 256, 1280, 10240, 2), ("SD1.5 mid to_out K4", 32, 64, 1280, 1280, 4),
            ("no-token linear", 64, 0, 1280, 1280, 1)]
CPU_LORA = [("tiny to_q", 2, 40, 48, 48, 2)]
LORA_RANK, LORA_SLOTS = 64, 8
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def matmul_peak_tflops(device, dtype, ms) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / ms(lambda: a @ b) / 1e9


def attention_flops(B, H, Lq, Lk, D, causal) -> float:
    flops = 4 * B * H * Lq * Lk * D
    return flops / 2 if causal and Lq == Lk else flops


def bench_attention(shapes, device, dtype, ms, peak):
    from rfserve import kernels
    rows = []
    for name, B, H, Lq, Lk, D, causal in shapes:
        q = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H, Lk, D, device=device, dtype=dtype) for _ in range(2))
        flops = attention_flops(B, H, Lq, Lk, D, causal)
        times = {"ours (triton)": _try(ms, lambda: kernels.attention(q, k, v, causal=causal, backend="triton"))}
        if device.type == "cuda":
            for label, backend in SDPA_BACKENDS.items():
                times[f"sdpa {label}"] = _try(ms, lambda b=backend: _sdpa(q, k, v, causal, b))
        else:
            times["sdpa (cpu)"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        kernels.clear_decisions()
        kernels.attention(q, k, v, causal=causal)  # let "auto" decide for this shape
        (decision,) = kernels.decisions().values()
        sdpa = {label: t for label, t in times.items() if label.startswith("sdpa") and t is not None}
        best = min(sdpa, key=sdpa.get)
        ours = times["ours (triton)"]
        rows.append(dict(
            name=name, shape=[B, H, Lq, Lk, D], causal=causal, ms=times,
            tflops={label: (flops / t / 1e9 if t else None) for label, t in times.items()},
            best_sdpa=best, ratio_to_best=(sdpa[best] / ours if ours else None),
            pct_of_peak=(flops / ours / 1e9 / peak * 100 if ours else None), dispatch=decision.backend,
        ))
    return rows


def _sdpa(q, k, v, causal, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _try(ms, fn):
    """A backend that rejects a shape (e.g. flash with d=160 on some builds) gets no time, not a crash."""
    try:
        return ms(fn)
    except RuntimeError:
        return None


def bench_velocity(shapes, device, dtype, ms):
    from rfserve import kernels
    from rfserve.kernels.velocity import cfg_euler_step_torch

    rows = []
    for name, shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        v = torch.randn(2 * shape[0], *shape[1:], device=device, dtype=dtype)
        g = torch.rand(shape[0], device=device) * 8 + 1  # per-row guidance, the batcher's case
        traffic = 4 * x.numel() * x.element_size()  # read x and both halves of v, write x
        src = torch.empty(2 * x.numel(), device=device, dtype=dtype)  # a copy moving the same bytes
        dst = torch.empty_like(src)
        times = {
            "ours (triton)": ms(lambda: kernels.cfg_euler_step(x, v, 0.1, g, backend="triton")),
            "torch twin": ms(lambda: cfg_euler_step_torch(x, v, 0.1, g)),
            "copy": ms(lambda: dst.copy_(src)),
        }
        gbps = {label: traffic / t / 1e6 for label, t in times.items()}
        rows.append(dict(name=name, shape=list(shape), ms=times, gbps=gbps,
                         pct_of_copy=gbps["ours (triton)"] / gbps["copy"] * 100))
    return rows


def bench_lora(shapes, device, dtype, ms):
    """Both backends of `lora_delta` on a binding that mixes adapters and the zero slot, and the base layer's
    matmul for scale: the update is worth fusing only while it stays small next to the layer it rides on."""
    from rfserve.kernels.lora import lora_delta, lora_delta_torch

    rows_out = []
    for name, rows, tokens, n_in, n_out, k in shapes:
        x = torch.randn(rows, *([tokens] if tokens else []), n_in, device=device, dtype=dtype)
        a = torch.randn(LORA_SLOTS + 1, LORA_RANK, n_in, device=device, dtype=dtype) / n_in ** 0.5
        b = torch.randn(LORA_SLOTS + 1, n_out, LORA_RANK, device=device, dtype=dtype) / LORA_RANK ** 0.5
        a[0], b[0] = 0, 0
        slots = torch.randint(0, LORA_SLOTS + 1, (rows, k), device=device)
        scales = torch.rand(rows, k, device=device)
        weight = torch.randn(n_out, n_in, device=device, dtype=dtype)
        times = {
            "ours (triton)": ms(lambda: lora_delta(x, a, b, slots, scales, backend="triton")),
            "torch twin": ms(lambda: lora_delta_torch(x, a, b, slots, scales)),
            "base layer": ms(lambda: F.linear(x, weight)),
        }
        rows_out.append(dict(name=name, shape=[rows, tokens, n_in, n_out, LORA_RANK, k], ms=times,
                             speedup=times["torch twin"] / times["ours (triton)"]))
    return rows_out


def environment(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}, " \
        f"{os.cpu_count()} cores), Triton interpreter"
    return dict(device=name, torch=torch.__version__, triton=triton_version,
                date=datetime.date.today().isoformat(), interpreter=device.type != "cuda")


def markdown(report) -> str:
    env = report["environment"]
    lines = [f"Device: {env['device']}; torch {env['torch']}, Triton {env['triton']}; {env['date']}; "
             f"dtype {report['dtype']}; peak (measured matmul) {_fmt(report['peak_tflops'], 3)} TFLOP/s."]
    if env["interpreter"]:
        lines.append("CPU run: tiny shapes, Triton in its interpreter. Not a performance figure.")
    labels = list(report["attention"][0]["tflops"])
    lines += ["", "| attention (B, H, Lq, Lk, D) | causal | " + " | ".join(f"{lab} TFLOP/s" for lab in labels)
              + " | ours / best SDPA | ours % of peak | dispatch |",
              "|---|---|" + "---|" * (len(labels) + 3)]
    for r in report["attention"]:
        cells = [_fmt(r["tflops"][lab], 3) for lab in labels]
        lines.append(f"| {r['name']} {tuple(r['shape'])} | {r['causal']} | " + " | ".join(cells)
                     + f" | {_fmt(r['ratio_to_best'], 2)}× | {_fmt(r['pct_of_peak'], 1)} | {r['dispatch']} |")
    lines += ["", "| velocity (cfg_euler, per-row guidance) | ours GB/s | twin GB/s | copy GB/s | ours % of copy |",
              "|---|---|---|---|---|"]
    for r in report["velocity"]:
        g = r["gbps"]
        lines.append(f"| {r['name']} {tuple(r['shape'])} | {_fmt(g['ours (triton)'], 2)} | "
                     f"{_fmt(g['torch twin'], 2)} | {_fmt(g['copy'], 2)} | {_fmt(r['pct_of_copy'], 1)} |")
    lines += ["", "| LoRA (R, L, in, out, rank, K) | ours ms | twin ms | base layer ms | twin / ours |",
              "|---|---|---|---|---|"]
    for r in report["lora"]:
        t = r["ms"]
        cells = [_fmt(t[label], 3) for label in ("ours (triton)", "torch twin", "base layer")]
        lines.append(f"| {r['name']} {tuple(r['shape'])} | " + " | ".join(cells) + f" | {_fmt(r['speedup'], 2)}× |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if use_cuda else torch.float32  # the interpreter's bf16 dot is broken
    warmup, repeat = (3, 10) if use_cuda else (1, 3)

    def ms(fn):
        return median_ms(fn, device, warmup=warmup, repeat=repeat)

    peak = matmul_peak_tflops(device, dtype, ms)
    report = dict(
        environment=environment(device), dtype=str(dtype).removeprefix("torch."), peak_tflops=peak,
        attention=bench_attention(GPU_ATTENTION if use_cuda else CPU_ATTENTION, device, dtype, ms, peak),
        velocity=bench_velocity(GPU_VELOCITY if use_cuda else CPU_VELOCITY, device, dtype, ms),
        lora=bench_lora(GPU_LORA if use_cuda else CPU_LORA, device, dtype, ms),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "bench_kernels.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
