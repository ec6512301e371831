"""PNG plots for the suite (latency against concurrency, throughput against batch) and the host benchmark."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _footer(fig, report: dict) -> None:
    env = report["env"]
    fig.text(0.01, -0.04, f"{env['device']} · torch {env['torch']} · {env['date']}", fontsize=7, color="gray")


def plot_latency(report: dict, path: Path) -> None:
    rows = report["http"]["closed_loop"]
    conc = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99")):
        ax.plot(conc, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"HTTP latency · {report['model'].split('=')[0]}")
    ax.legend()
    ax.grid(alpha=0.3)
    _footer(fig, report)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_throughput(report: dict, path: Path) -> None:
    rows = report["model_level"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({r["size"] for r in rows}):
        sel = [r for r in rows if r["size"] == size]
        batches = [r["batch"] for r in sel]
        ax.plot(batches, [r["ours_img_s"] for r in sel], marker="o", label=f"rfserve {size}")
        ax.plot(batches, [r["baseline_img_s"] for r in sel], marker="x", linestyle="--", label=f"diffusers {size}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (model level)")
    ax.set_title(f"Throughput · {report['model'].split('=')[0]}")
    ax.legend()
    ax.grid(alpha=0.3)
    _footer(fig, report)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_host(report: dict, path: Path) -> None:
    """Server CPU per image for each b64_json configuration at n = 4, one bar per version measured."""
    labels = list(report["versions"])
    keys = [(r["format"], r["size"]) for r in report["versions"][labels[0]]["cost"]
            if r["response_format"] == "b64_json" and r["n"] == 4]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        by_key = {(r["format"], r["size"]): r["server_cpu_ms_per_image"] or 0 for r in report["versions"][label]["cost"]
                  if r["response_format"] == "b64_json" and r["n"] == 4}
        ax.bar([k + i * width for k in range(len(keys))], [by_key.get(k, 0) for k in keys], width, label=label)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(keys))],
                  [f"{fmt} {side}²" for fmt, side in keys])
    ax.set_yscale("log")
    ax.set_ylabel("server CPU ms per image (log)")
    ax.set_title("Host path: server CPU per image (b64_json, n = 4, no pace)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _footer(fig, report)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_joining(report: dict, model: dict, path: Path) -> None:
    """p99 latency of each step class against the load, joining on (solid) and off (dashed), one colour a class."""
    loads = [100 * lv["load"] for lv in model["levels"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, steps in enumerate(model["mix"]):
        for mode, style in (("on", "-"), ("off", "--")):
            ax.plot(loads, [lv[mode]["classes"][str(steps)]["p99_ms"] for lv in model["levels"]], style,
                    color=f"C{k}", marker="o" if mode == "on" else "x", label=f"{steps} steps, joining {mode}")
    ax.set_yscale("log")
    ax.set_xlabel("load, % of capacity (joining off, saturated)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title(f"Continuous image batching · {model['model']}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _footer(fig, report)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
