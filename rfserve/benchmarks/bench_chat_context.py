"""Chat decode against the context length (issue #32): a step costs the live tokens, not the cache width.

Two figures, each against its baseline in the same run:
- the compiled decode step of 8 running sequences of about 300 tokens, with a per-sequence context (`max_len`) of
  512, 16,384 and 65,536 tokens, captured as the server captures it (`PagedDecoder.fast_path`: the row bucket, and
  on the CPU a width bucket per power of two of blocks); beside it the same step captured at the whole context
  width only, as the slot cache stepped before paging (one table as wide as `max_len`), to show what paging saved;
- 8 greedy streams through the continuous batcher (eager, then compiled) against transformers' `generate()` with a
  static cache (`cache_implementation="static"`, gpt-fast's layout) and with its default dynamic cache.

Random weights; `--tiny` runs the tiny JanusFlow on the CPU in fp32, otherwise JanusFlow-1.3B's architecture on
CUDA in bf16.

    python -m rfserve.benchmarks.bench_chat_context [--tiny] [--contexts 512,16384,65536] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import transformers

from rfserve.benchmarks.bench_janusflow import chat_prompt, hf_decode, ours_decode, random_parts, timed
from rfserve.benchmarks.capture import capture, resolve_mode, summary
from rfserve.benchmarks.timing import device_label, save_report
from rfserve.model_zoo.janusflow.decoder import JanusFlowChat
from rfserve.model_zoo.paged_kv import blocks_for

STREAMS, LIVE = 8, 300           # running sequences, and about how many tokens each holds


def step_ms(chat: JanusFlowChat, max_len: int, mode: str, whole_width: bool, device: torch.device) -> dict:
    """Median ms of one compiled decode step of STREAMS sequences of about LIVE tokens at this `max_len`. The pool
    holds exactly their blocks, so only the context, never the pool, differs between runs."""
    lengths = [LIVE - 3 * i for i in range(STREAMS)]
    decoder = chat.decoder(STREAMS, max_len, STREAMS * blocks_for(LIVE + 1) + 1)
    fast = decoder.fast_path((STREAMS,))
    if whole_width:
        decoder.width_buckets = (blocks_for(max_len),)          # the slot cache's step: one table of the context
    info = capture(fast, decoder.capture, mode, runs=1)
    tables = [decoder.blocks.allocate(blocks_for(n + 1)) or [] for n in lengths]
    ms = 1000 * timed(lambda: decoder.decode([5] * STREAMS, lengths, tables), device, repeats=20, warmup=3)
    return {"max_len": max_len, "whole_width": whole_width, "step_ms": ms, "widths": list(decoder.width_buckets),
            "capture": info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny JanusFlow on the CPU")
    ap.add_argument("--contexts", default="512,16384,65536")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per stream (default 64 tiny, 128 GPU)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the 1.3B benchmark needs CUDA; use --tiny on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype, name = (torch.float32, "tiny") if args.tiny else (torch.bfloat16, "janusflow-1.3b")
    mode = resolve_mode(None, device)
    assert mode is not None
    parts = random_parts(name, device, dtype)
    chat, contexts = JanusFlowChat(parts), [int(c) for c in args.contexts.split(",")]
    new_tokens = args.new_tokens or (64 if args.tiny else 128)
    steps = [step_ms(chat, c, mode, whole, device) for c in contexts for whole in (False, True)]
    streams = ours_decode(chat, chat_prompt(parts), STREAMS, new_tokens, device, mode)
    result = {
        "date": datetime.date.today().isoformat(), "device": device_label(device), "torch": torch.__version__, "transformers": transformers.__version__, "preset": name, "compile_mode": mode,
        "steps": steps,
        "streams": {"streams": STREAMS, "new_tokens": new_tokens, **streams,
                    "hf_static_tok_s": hf_decode(parts, STREAMS, new_tokens, cache_implementation="static"),
                    "hf_dynamic_tok_s": hf_decode(parts, STREAMS, new_tokens)},
    }
    save_report(args.out, "bench_chat_context_tiny" if args.tiny else "bench_chat_context", result, markdown)


def markdown(r: dict) -> str:
    base = {s["whole_width"]: s["step_ms"] for s in r["steps"] if s["max_len"] == r["steps"][0]["max_len"]}
    lines = [f"Chat decode against context, JanusFlow ({r['preset']}), {r['device']}, torch {r['torch']}, "
             f"transformers {r['transformers']}, {r['date']}; compiled step mode {r['compile_mode']}", "",
             f"| context per sequence | step, paged (width buckets) | / at {r['steps'][0]['max_len']:,} | "
             "step, whole-context table (before paging) | / at the first context |", "|---|---|---|---|---|"]
    for c in dict.fromkeys(s["max_len"] for s in r["steps"]):
        paged, whole = (next(s for s in r["steps"] if s["max_len"] == c and s["whole_width"] == w) for w in (0, 1))
        lines.append(f"| {c:,} | {paged['step_ms']:.2f} ms | {paged['step_ms'] / base[False]:.2f}x | "
                     f"{whole['step_ms']:.2f} ms | {whole['step_ms'] / base[True]:.2f}x |")
    s = r["streams"]
    ours = s.get("compiled_tok_s", s["ours_tok_s"])
    lines += ["", f"{STREAMS} sequences of about {LIVE} tokens each, one decode step; captures: " +
              "; ".join(f"{x['max_len']:,}{' whole' if x['whole_width'] else ''}: {summary(x['capture'])}"
                        for x in r["steps"]), "",
              "| streams | new tokens each | ours eager tok/s | ours compiled tok/s | generate() static cache tok/s | "
              "generate() dynamic cache tok/s | ours compiled / static |", "|---|---|---|---|---|---|---|",
              f"| {s['streams']} | {s['new_tokens']} | {s['ours_tok_s']:.1f} | {ours:.1f} | "
              f"{s['hf_static_tok_s']:.1f} | {s['hf_dynamic_tok_s']:.1f} | {ours / s['hf_static_tok_s']:.2f}x |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
