"""PNG plots for the suite: latency against concurrency, throughput against batch."""
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
