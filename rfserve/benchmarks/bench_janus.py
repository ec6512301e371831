"""Janus-Pro, ours against transformers in the same run: text-to-image against
`generate(generation_mode="image")`, and chat decode tokens/s against `generate()`.

Both sample the G image tokens at the official defaults (CFG weight 5, temperature 1) on the same random
weights and prompts and decode them with the same VQ decoder; the figure is seconds per image (the batch's
median wall time over its size), at batch 1 and 8. transformers runs its own loop over a StaticCache; ours
runs `JanusPipeline.run` (begin, then one step per image token, as the server steps it) over the preallocated
buffers of `model_zoo.janusflow.llm`, so the ratio also says which cache is faster here. Chat: greedy streams of one prompt, 1 and 8 at once, through our continuous
batcher (the slot KV cache) against one batched `generate()` of the same count. Ours runs eagerly, then
through the compiled fast path as the server serves it (`--compile-mode`; benchmarks.capture): the token
step captured at every batch, and for decode a fresh decoder whose step is captured at that many streams.
The tiny preset runs on the CPU in seconds, and each of its graphs compiles in 10 to 30 s there; `--real`
builds the Janus-Pro-1B architecture with random weights (bf16 on CUDA; fp32 on the CPU, where it takes
many minutes).

    python -m rfserve.benchmarks.bench_janus [--real] [--batches 1,8] [--concurrency 1,8] [--compile-mode MODE|off]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import transformers

from rfserve.benchmarks.bench_janusflow import QUESTION, decode_table, ours_decode, sync
from rfserve.benchmarks.capture import add_mode_flag, capture, resolve_mode, summary
from rfserve.benchmarks.timing import call_ms, device_label, save_report
from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.janus.chat import JanusChat
from rfserve.model_zoo.janus.config import ARCHS, GENERATION_DEFAULTS
from rfserve.model_zoo.janus.loading import JanusParts
from rfserve.model_zoo.janus.pipeline import JanusPipeline
from rfserve.model_zoo.janus.random_checkpoint import build_processor, random_model

PROMPTS = ["a photo of a cat sitting on a red chair", "a blue square next to a green circle",
           "the quick brown fox jumps over the lazy dog", "write a short poem about the sea",
           "a red chair", "describe the image in detail", "what color is the sky", "a cat"]


def random_pipeline(name: str, device: torch.device, dtype: torch.dtype) -> JanusPipeline:
    arch = ARCHS[name]
    processor = build_processor(arch.image_size, arch.image_tokens)
    model = random_model(name, processor, seed=0).to(device=device, dtype=dtype)
    parts = JanusParts(model, processor, model.generation_config, device, dtype)
    return JanusPipeline(parts, temperature=GENERATION_DEFAULTS.temperature)


def ours(pipe: JanusPipeline, prompts: list[str]) -> None:
    side = pipe.parts.image_side
    pipe.run([ImageSpec(p, "", seed, side, side, 1, GENERATION_DEFAULTS.cfg_weight) for seed, p in enumerate(prompts)])


@torch.inference_mode()
def transformers_generate(pipe: JanusPipeline, prompts: list[str]) -> None:
    """The documented recipe: the chat template, the processor in image mode, generate, decode_image_tokens."""
    proc, model = pipe.parts.processor, pipe.parts.model
    chats = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                      add_generation_prompt=True) for p in prompts]
    inputs = proc(text=chats, generation_mode="image", padding=True, return_tensors="pt").to(pipe.parts.device)
    tokens = model.generate(**inputs, generation_mode="image", do_sample=True,
                            temperature=GENERATION_DEFAULTS.temperature, guidance_scale=GENERATION_DEFAULTS.cfg_weight)
    model.decode_image_tokens(tokens).float().cpu()


def bench(pipe: JanusPipeline, batch: int, warmup: int, repeat: int) -> dict:
    """Ours eager against transformers. The two runs alternate after both have warmed up, so that a noisy,
    shared host slows both alike."""
    prompts, device = PROMPTS[:batch], pipe.parts.device
    runs = {"ours": lambda: ours(pipe, prompts), "transformers": lambda: transformers_generate(pipe, prompts)}
    for fn in [*runs.values()] * warmup:
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            times[name].append(call_ms(fn, device) / 1e3 / batch)
    ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return {"batch": batch, "ours_s_per_image": ours_s, "transformers_s_per_image": ref_s, "speedup": ref_s / ours_s}


def bench_compiled(pipe: JanusPipeline, rows: list[dict], repeat: int, mode: str) -> dict:
    """After the eager rows: the token step captured at every row's batch, then ours timed again per batch (alone:
    the eager path is gone once captured). Fills in the rows; returns the capture."""
    def every_batch() -> None:
        for r in rows:
            ours(pipe, PROMPTS[:r["batch"]])

    info = capture(pipe.fast_path(), every_batch, mode)
    for r in rows:
        b = r["batch"]
        fast = statistics.median(call_ms(lambda: ours(pipe, PROMPTS[:b]), pipe.parts.device) / 1e3 / b
                                 for _ in range(repeat))
        r.update(compiled_s_per_image=fast, speedup=r["transformers_s_per_image"] / fast,
                 eager_over_compiled=r["ours_s_per_image"] / fast)
    return info


@torch.inference_mode()
def hf_decode(pipe: JanusPipeline, ids: list[int], concurrency: int, new_tokens: int) -> float:
    model, device, eos = pipe.parts.model, pipe.parts.device, pipe.parts.tokenizer.eos_token_id
    input_ids = torch.tensor([ids] * concurrency, device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos,
              eos_token_id=None)
    model.generate(input_ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})     # warm-up
    sync(device)
    start = time.perf_counter()
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    sync(device)
    return concurrency * new_tokens / (time.perf_counter() - start)


def decode(pipe: JanusPipeline, concurrency: list[int], new_tokens: int, mode: str | None) -> list[dict]:
    chat = JanusChat(pipe.parts)
    ids = chat.processor.prompt([("User", QUESTION)], chat.processor.default_system, []).ids
    return [{"concurrency": c, "new_tokens": new_tokens,
             **ours_decode(chat, ids, c, new_tokens, pipe.parts.device, mode),
             "hf_generate_tok_s": hf_decode(pipe, ids, c, new_tokens)} for c in concurrency]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="the Janus-Pro-1B architecture with random weights")
    ap.add_argument("--batches", default="1,8", help="text-to-image batch sizes, comma-separated")
    ap.add_argument("--concurrency", default="1,8", help="chat decode streams, comma-separated")
    ap.add_argument("--repeat", type=int, help="timed runs per case (default 9 tiny, 2 real)")
    ap.add_argument("--warmup", type=int, help="untimed runs first (default 3 tiny, 1 real)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    add_mode_flag(ap)
    args = ap.parse_args()
    device = torch.device("cuda" if args.real and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = "janus-pro-1b" if args.real else "tiny"
    mode = resolve_mode(args.compile_mode, device)
    pipe = random_pipeline(name, device, dtype)
    warmup, repeat = (1, 2) if args.real else (3, 9)
    warmup, repeat = args.warmup if args.warmup is not None else warmup, args.repeat or repeat
    t2i = [bench(pipe, int(b), warmup, repeat) for b in args.batches.split(",")]
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device_label(device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "preset": name, "image_tokens": pipe.parts.num_image_tokens,
        "image_side": pipe.parts.image_side,
        "compile_mode": mode, "t2i_capture": bench_compiled(pipe, t2i, repeat, mode) if mode else None, "t2i": t2i,
        "decode": decode(pipe, [int(c) for c in args.concurrency.split(",")], 32 if args.real else 16, mode),
    }
    save_report(args.out, f"bench_janus_{name}", result, markdown)


def markdown(r: dict) -> str:
    fast = r["t2i_capture"] is not None
    lines = [f"Janus ({r['preset']}: {r['image_tokens']} tokens, {r['image_side']}²), {r['device']}, "
             f"torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, {r['date']}", "",
             "| batch | ours eager s/image | ours compiled s/image | transformers generate s/image | "
             f"transformers / ours {'compiled' if fast else 'eager'} | eager / compiled |", "|---|---|---|---|---|---|"]
    for t in r["t2i"]:
        compiled = (f"{t['compiled_s_per_image']:.4f}", f"{t['eager_over_compiled']:.2f}x") if fast else ("—", "—")
        lines.append(f"| {t['batch']} | {t['ours_s_per_image']:.4f} | {compiled[0]} | "
                     f"{t['transformers_s_per_image']:.4f} | {t['speedup']:.2f}x | {compiled[1]} |")
    lines += ["", "Compiled: " + (f"mode {r['compile_mode']}, the token step at every batch; "
                                  f"{summary(r['t2i_capture'])}." if fast else "off."),
              "", *decode_table(r["decode"], r["compile_mode"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
