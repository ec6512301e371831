"""JanusFlow model-level benchmark, ours against the reference-style baselines in the same run.

- text-to-image, N Euler steps with CFG: ours (prompt KV computed once, 1 + G tokens per step)
  vs the official loop (full [prompt | t_emb | image] recompute every step); seconds per image;
- chat decode tokens/s at concurrency 1/8/32: our continuous batcher vs transformers
  `generate()` (dynamic cache, greedy, same prompts, EOS ignored so every stream runs its budget).

Ours runs eagerly, then through the compiled fast path as the server serves it (`--compile-mode`;
benchmarks.capture): the flow step captured at this bucket, and for decode a fresh decoder whose step is
captured at the bucket of that many streams. Random weights in the real JanusFlow-1.3B architecture on CUDA
in bf16 (timing does not depend on the weight values); `--tiny` runs the tiny preset on CPU end to end.

    python -m rfserve.benchmarks.bench_janusflow [--tiny] [--concurrency 1,8,32] [--compile-mode MODE|off] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from rfserve.benchmarks.capture import add_mode_flag, capture, resolve_mode, summary
from rfserve.benchmarks.timing import device_label, save_report
from rfserve.model_zoo.base import ChatDecoder, ChatParts, ImageSpec
from rfserve.model_zoo.janusflow.config import JanusFlowConfig, preset
from rfserve.model_zoo.janusflow.decoder import JanusFlowChat
from rfserve.model_zoo.janusflow.loading import JanusFlowParts
from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline
from rfserve.model_zoo.janusflow.processor import SYSTEM_PROMPT, USER, ImageProcessorConfig, JanusFlowProcessor, sft_prompt
from rfserve.model_zoo.janusflow.random_checkpoint import build_tokenizer, random_model, random_vae
from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher

PROMPT = "a photo of a cat sitting on a red chair next to a blue square"
QUESTION = "describe the image in detail and write a short poem about the sea"


def random_parts(name: str, device: torch.device, dtype: torch.dtype) -> JanusFlowParts:
    cfg = JanusFlowConfig.from_dict(preset(name))
    tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer())
    side = cfg.understanding.image_size
    proc = JanusFlowProcessor(tok, ImageProcessorConfig(image_size=side), cfg.understanding.num_tokens)
    model = random_model(cfg, seed=0, device=device).to(dtype)
    vae = random_vae(name, seed=0).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return JanusFlowParts(cfg, model, proc, vae, device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds after warm-up, synchronised at both ends."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def reference_t2i(parts: JanusFlowParts, prompt: str, z: torch.Tensor, steps: int, w: float) -> torch.Tensor:
    """The official demo loop: the whole sequence through the LLM at every step."""
    model, proc = parts.model, parts.processor
    lm, B, G = model.language_model, z.shape[0], parts.num_gen_tokens
    ids = torch.tensor(proc.t2i_prefix(prompt) + [proc.image_start_id], device=z.device)
    tokens = torch.stack([ids] * 2 * B)
    tokens[B:, 1:] = proc.pad_id
    embeds = lm.get_input_embeddings()(tokens)[:, :-1]
    mask = torch.ones(2 * B, embeds.shape[1] + 1 + G, dtype=torch.int, device=z.device)
    mask[B:, 1:embeds.shape[1]] = 0
    dt = torch.zeros_like(z) + 1.0 / steps
    for step in range(steps):
        t = torch.full((2 * B,), step / steps * 1000.0, device=z.device).to(dt)
        tokens_g, t_emb, skips = model.encode_latents(torch.cat([z, z]), t)
        hidden = lm.model(inputs_embeds=torch.cat([embeds, t_emb[:, None], tokens_g], 1),
                          attention_mask=mask).last_hidden_state
        v_cond, v_uncond = model.decode_velocity(hidden[:, -G:], skips, t_emb).chunk(2)
        z = z + dt * (w * v_cond - (w - 1.0) * v_uncond)
    return z


def bench_t2i(parts: JanusFlowParts, steps: int, repeats: int, mode: str | None) -> dict:
    """Ours eagerly, the reference, then (with a compile `mode`) ours again after capturing the flow step. Ours
    "sample" is begin (tokens, noise, the prompt prefill) and the steps, as the server runs them; "with VAE" is
    `run`, which also decodes."""
    pipe = JanusFlowPipeline(parts)
    side, _ = pipe.default_size
    spec = ImageSpec(PROMPT, "", 0, side, side, steps, 2.0)
    z = pipe.noise([spec.seed])

    def sample() -> torch.Tensor:
        running = pipe.begin([spec])
        while running.stepping():
            pipe.step(running)
        return running.rows["z"]

    def ours() -> tuple[float, float]:
        return timed(sample, parts.device, repeats), timed(lambda: pipe.run([spec]), parts.device, repeats)

    (eager, eager_e2e), ref = ours(), timed(lambda: reference_t2i(parts, PROMPT, z, steps, 2.0), parts.device, repeats)
    out: dict = {"steps": steps, "batch": 1, "ours_sample_s": eager, "ours_with_vae_s": eager_e2e,
                 "reference_sample_s": ref, "speedup": ref / eager, "prompt_tokens": pipe.prompt_tokens(PROMPT),
                 "capture": None}
    if mode:
        out["capture"] = capture(pipe.fast_path(), sample, mode)
        fast, fast_e2e = ours()
        out.update(compiled_sample_s=fast, compiled_with_vae_s=fast_e2e, speedup=ref / fast,
                   eager_over_compiled=eager / fast)
    return out


def chat_prompt(parts: JanusFlowParts) -> list[int]:
    ids, _ = parts.processor.chat_ids(sft_prompt([(USER, QUESTION)], SYSTEM_PROMPT))
    return ids


def ours_decode(chat: ChatParts, ids: list[int], concurrency: int, new_tokens: int, device: torch.device,
                mode: str | None) -> dict:
    """Aggregate tokens/s of `concurrency` greedy streams of one prompt through a chat model's continuous batcher:
    eagerly, then (with a compile `mode`) on a fresh decoder whose step is captured at the bucket of
    `concurrency` rows before its batcher starts, as the server's warm-up captures it."""
    max_len = len(ids) + new_tokens + 1
    out: dict = {"ours_tok_s": _batcher_tok_s(chat, chat.decoder(concurrency, max_len), ids, concurrency,
                                              new_tokens, device)}
    if mode:
        decoder = chat.decoder(concurrency, max_len)
        out["capture"] = capture(decoder.fast_path((concurrency,)), decoder.capture, mode, runs=1)
        out["compiled_tok_s"] = _batcher_tok_s(chat, decoder, ids, concurrency, new_tokens, device)
    return out


def _batcher_tok_s(chat: ChatParts, decoder: ChatDecoder, ids: list[int], concurrency: int, new_tokens: int,
                   device: torch.device) -> float:
    """Tokens/s of the timed streams, after one short stream through the same batcher, untimed, so that they do
    not pay the first steps' one-time costs (the prefill's first shapes, the batcher thread's first launches)."""
    batcher = ContinuousBatcher(decoder, chat.tokenizer, eos_id=-1, max_waiting=concurrency).start()

    def run(streams: int, tokens: int) -> float:
        finished, done = [], threading.Event()

        def emit(event):                       # runs on the batcher thread
            if event.finish_reason:
                finished.append(event)
                if len(finished) == streams:
                    done.set()

        seqs = [ChatSequence(ids, None, [], tokens, 0.0, 1.0, [], None, emit) for _ in range(streams)]
        sync(device)
        start = time.perf_counter()
        for seq in seqs:
            batcher.submit(seq)
        done.wait()
        return time.perf_counter() - start

    run(1, 4)
    elapsed = run(concurrency, new_tokens)
    batcher.close()
    return concurrency * new_tokens / elapsed


@torch.inference_mode()
def hf_decode(parts: JanusFlowParts, concurrency: int, new_tokens: int,
              cache_implementation: str | None = None) -> float:
    """Tokens/s of transformers' `generate()` over `concurrency` copies of the prompt; `cache_implementation`
    "static" preallocates the cache as gpt-fast does (default: the dynamic cache)."""
    lm, ids = parts.model.language_model, chat_prompt(parts)
    input_ids = torch.tensor([ids] * concurrency, device=parts.device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=parts.processor.pad_id, eos_token_id=None, cache_implementation=cache_implementation)
    lm.generate(input_ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})     # warm-up
    sync(parts.device)
    start = time.perf_counter()
    lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    sync(parts.device)
    return concurrency * new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (end-to-end check)")
    ap.add_argument("--concurrency", default="1,8,32", help="chat decode streams, comma-separated (one compiled "
                                                             "decode step each)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    add_mode_flag(ap)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the 1.3B benchmark needs CUDA; use --tiny on CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    name = "tiny" if args.tiny else "janusflow-1.3b"
    mode = resolve_mode(args.compile_mode, device)
    parts = random_parts(name, device, dtype)
    steps, repeats, new_tokens = (30, 2, 16) if args.tiny else (30, 5, 128)
    chat, ids, concurrency = JanusFlowChat(parts), chat_prompt(parts), [int(c) for c in args.concurrency.split(",")]
    result = {
        "date": datetime.date.today().isoformat(), "device": device_label(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."), "preset": name,
        "compile_mode": mode, "t2i": bench_t2i(parts, steps, repeats, mode),
        "decode": [{"concurrency": c, "new_tokens": new_tokens, **ours_decode(chat, ids, c, new_tokens, device, mode),
                    "hf_generate_tok_s": hf_decode(parts, c, new_tokens)} for c in concurrency],
    }
    save_report(args.out, "bench_janusflow_tiny" if args.tiny else "bench_janusflow", result, markdown)


def markdown(r: dict) -> str:
    t = r["t2i"]
    fast = t["capture"] is not None
    compiled = (f"{t['compiled_sample_s']:.3f} s", f"{t['compiled_with_vae_s']:.3f} s",
                f"{t['eager_over_compiled']:.2f}x") if fast else ("—", "—", "—")
    lines = [f"JanusFlow ({r['preset']}), {r['device']}, torch {r['torch']}, transformers {r['transformers']}, "
             f"{r['dtype']}, {r['date']}", "",
             "| text-to-image, 1 image, CFG, steps | ours eager (KV reuse) | ours compiled | ours + VAE, eager / "
             f"compiled | reference recompute | reference / ours {'compiled' if fast else 'eager'} | "
             "eager / compiled |", "|---|---|---|---|---|---|---|",
             f"| {t['steps']} | {t['ours_sample_s']:.3f} s | {compiled[0]} | {t['ours_with_vae_s']:.3f} s / "
             f"{compiled[1]} | {t['reference_sample_s']:.3f} s | {t['speedup']:.2f}x | {compiled[2]} |", "",
             "Compiled: " + (f"mode {r['compile_mode']}, the flow step; {summary(t['capture'])}." if fast else "off."),
             "", *decode_table(r["decode"], r["compile_mode"])]
    return "\n".join(lines) + "\n"


def decode_table(rows: list[dict], mode: str | None) -> list[str]:
    """The chat decode rows (ours eager and compiled against transformers' `generate()`) as a markdown table, and
    each compiled row's capture."""
    lines = ["| chat decode, streams | new tokens each | ours eager tok/s (aggregate) | ours compiled tok/s | "
             f"transformers generate tok/s | ours {'compiled' if mode else 'eager'} / transformers | "
             "compiled / eager |", "|---|---|---|---|---|---|---|"]
    for d in rows:
        ours = d.get("compiled_tok_s", d["ours_tok_s"])
        compiled = (f"{ours:.1f}", f"{ours / d['ours_tok_s']:.2f}x") if mode else ("—", "—")
        lines.append(f"| {d['concurrency']} | {d['new_tokens']} | {d['ours_tok_s']:.1f} | {compiled[0]} | "
                     f"{d['hf_generate_tok_s']:.1f} | {ours / d['hf_generate_tok_s']:.2f}x | {compiled[1]} |")
    captures = "; ".join(f"{d['concurrency']} streams: {summary(d['capture'])}" for d in rows) if mode else ""
    return lines + ["", f"Compiled decode: mode {mode}, the step captured at each row's streams; {captures}."
                    if mode else "Compiled decode: off."]


if __name__ == "__main__":
    main()
