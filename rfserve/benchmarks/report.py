"""Markdown tables for the suite's JSON."""
from __future__ import annotations

from rfserve.benchmarks.capture import summary


def markdown(report: dict) -> str:
    env = report["env"]
    out = [f"# rfserve bench: {report['model'].split('=')[0]}", "",
           f"Device: {env['device']} ({env['processor'] or env['machine']}, {env['cpus']} CPUs) · "
           f"torch {env['torch']} · Python {env['python']} · {env['date']}", ""]
    if "model_level" in report:
        out += ["## Model level (median ms; speedup = diffusers / ours)", "",
                "| size | batch | steps | encode ours / base | sample ours / base | decode ours / base | "
                "e2e ours / base | speedup | img/s ours / base |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["model_level"]:
            cells = [f"{r[s]['ours_ms']:.1f} / {r[s]['baseline_ms']:.1f}"
                     for s in ("encode", "sample", "decode", "e2e")]
            out.append(f"| {r['size']} | {r['batch']} | {r['steps']} | " + " | ".join(cells) +
                       f" | {r['e2e']['speedup']:.2f}× | {r['ours_img_s']:.1f} / {r['baseline_img_s']:.1f} |")
        info = report["model_level"][0].get("capture") if report["model_level"] else None
        out += ["", f"Ours compiled: mode {info['mode']}, every bucket; {summary(info)}." if info else
                "Ours eager (the fast path is compiled on CUDA only).", ""]
    if "http" in report:
        h = report["http"]
        out += ["## HTTP level", "", f"Time to first image after start: {h['time_to_first_image_s']:.1f} s; "
                f"saturation {h['saturation_img_s']:.1f} img/s.", "",
                "| clients | ok | errors | img/s | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
        for r in h["closed_loop"]:
            out.append(f"| {r['concurrency']} | {r['ok']} | {r['errors']} | {r['images_per_s']:.1f} | "
                       f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} |")
        o = h["open_loop"]
        out += ["", f"Open loop (Poisson) at {o['offered_rate']:.1f} req/s: {o['images_per_s']:.1f} img/s, "
                f"p50 {o['p50_ms']:.1f} ms, p90 {o['p90_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms, "
                f"statuses {o['statuses']}, lost {o['lost']}.", ""]
    return "\n".join(out)
