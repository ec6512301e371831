"""The `rfserve` command line: every subcommand's flags, their defaults and their help (`rfserve <command> -h`).
The commands themselves are in `server.cli`; this module imports nothing heavy, so `-h` and a bad flag answer
at once."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from rfserve import __version__
from rfserve.model_zoo.presets import PRESETS
from rfserve.server.chat.config import INT_SETTINGS, ChatConfig
from rfserve.server.config import LoraConfig, ServerConfig

CHAT_PRESETS = [name for name, preset in PRESETS.items() if preset.chats]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h shows every flag's default. A default of None, off or nothing is left to the flag's own help, which
    says what leaving the flag out means ("the model's own", "measured"); "default: None" would not. Lines
    break at spaces only, so a preset name such as perflow-sd15 is never split."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))


def _add_engine_args(p: argparse.ArgumentParser, *, many_models: bool) -> None:
    if many_models:
        p.add_argument("--model", action="append", dest="models", metavar="SPEC",
                       help="NAME or NAME=PATH_OR_HUB_ID[?variant=..&base=..], NAME one of the presets "
                            "below; repeat to serve several (default: the embedded rf-shapes)")
    else:
        p.add_argument("--model", dest="models", action="append", metavar="SPEC", help="as for serve")
    p.add_argument("--device", default="auto", help="auto (cuda where there is one) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfserve", description="Rectified-flow image server.")
    parser.add_argument("--version", action="version", version=f"rfserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI Images and Chat APIs", formatter_class=HelpFormatter,
                           epilog=f"presets: {', '.join(PRESETS)}. These also chat (POST /v1/chat/completions): "
                                  f"{', '.join(CHAT_PRESETS)}.")
    _add_engine_args(serve, many_models=True)
    d = ServerConfig()
    serve.add_argument("--host", default=d.host, help="address to listen on; 0.0.0.0 for every interface")
    serve.add_argument("--port", type=int, default=d.port, help="0 takes any free one, which the banner names")
    serve.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                       help="how long the batcher holds the oldest request for company")
    serve.add_argument("--continuous", choices=["on", "off"], default="on" if d.continuous else "off",
                       help="on: queued requests of a model and size join its running batch between denoising "
                            "steps, each with its own steps, guidance and strength; off: a batch is formed once, "
                            "of requests that share all of them, and runs to its end")
    serve.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests per model")
    serve.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds")
    serve.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    serve.add_argument("--max-input-pixels", type=int, default=d.max_input_pixels,
                       help="width x height cap on an edit's image and mask, checked before decoding")
    serve.add_argument("--max-steps", type=int, default=None, help="cap on num_inference_steps for every model (default: each model's own)")
    serve.add_argument("--max-request-timeout", type=float, default=d.max_request_timeout_s,
                       help="cap on a request's own `timeout` field, seconds")
    serve.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                       help="after SIGTERM, seconds for in-flight work to finish")
    serve.add_argument("--watchdog-timeout", type=float, default=d.watchdog_s,
                       help="a batch running longer turns /health unhealthy, seconds")
    serve.add_argument("--api-key", action="append", default=[], help="accepted bearer key; repeatable (default: none, and with no key file the API is open)")
    serve.add_argument("--api-key-file", help="file with one accepted key per line (default: none)")
    serve.add_argument("--protect-metrics", action="store_true", help="require a key for /metrics too")
    serve.add_argument("--model-root", help="local model paths must resolve inside this folder (default: anywhere)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="allowed CORS origin; repeatable (default: none, no CORS headers)")
    serve.add_argument("--log-prompts", action="store_true", help="log prompts (off by default)")
    serve.add_argument("--compile", choices=["auto", "on", "off"], default=d.compile,
                       help="compiled fast path per batch bucket (auto: captured before ready on CUDA; on the CPU "
                            "after ready, beside serving, for the families it pays for)")
    serve.add_argument("--compile-mode", default=d.compile_mode, help="torch.compile mode")
    serve.add_argument("--batch-buckets", default=",".join(map(str, d.batch_buckets)),
                       help="batch sizes captured by the fast path, comma-separated")
    serve.add_argument("--cpu-threads", type=int, default=None,
                       help="fixed torch threads when serving on CPU (default: cores - 1, and all cores "
                            "for the batch sizes warm-up measures faster on them)")
    chat = serve.add_argument_group("chat", f"for the models that chat ({', '.join(CHAT_PRESETS)}); each flag "
                                            "falls back to its RFSERVE_CHAT_* variable")
    for name, variable, meaning in INT_SETTINGS:
        chat.add_argument(f"--chat-{name.replace('_', '-')}", type=int, default=None, metavar="N",
                          help=f"{meaning}; ${variable}")
    chat.add_argument("--chat-image-host", action="append", default=[], metavar="HOST",
                      help="a host whose http(s) image URLs may be fetched; repeatable ($RFSERVE_CHAT_IMAGE_HOSTS; "
                           "default: none, remote image URLs are refused)")
    lora, dl = serve.add_argument_group("LoRA", "per-request adapters for the SD-UNet families and Hunyuan-DiT; "
                                                "rows with different adapters share a batch"), LoraConfig()
    lora.add_argument("--lora", action="append", default=[], metavar="NAME=PATH_OR_HUB_ID[?model=MODEL]",
                      help="an adapter requests may name in `lora`: a diffusers/peft or kohya .safetensors file, "
                           "a folder holding one, or a hub id; repeatable; implies --enable-lora (default: the "
                           "first model that takes LoRA)")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve adapters even with none at start (POST /v1/loras loads them)")
    lora.add_argument("--max-loras", type=int, default=dl.slots, metavar="N",
                      help="adapters resident on the device per model, swapped in from host memory (LRU)")
    lora.add_argument("--max-lora-rank", type=int, default=dl.max_rank, metavar="R",
                      help="the largest adapter rank served; every slot holds this rank")
    lora.add_argument("--max-loras-per-request", type=int, default=dl.per_request, metavar="K",
                      help="adapters one request may combine")
    serve.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="the share of the device's memory the server plans with, in (0, 1]")
    serve.add_argument("--device-memory", default=None, metavar="BYTES",
                       help="the memory the server may plan with instead of the device's total: 80GiB, 80GB or "
                            "bytes (default: the device's total)")
    serve.add_argument("--no-warmup", action="store_true",
                       help="ready as soon as the models load: no warm-up run, graph capture or CPU thread measurement")
    serve.add_argument("--enable-fault-injection", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="info", help="debug also prints the traceback of a failed start")
    serve.add_argument("--debug", action="store_true", help="print the traceback of a failed start")

    gen = sub.add_parser("generate", help="generate images in-process with the serving engine",
                         formatter_class=HelpFormatter)
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, type=Path,
                     help="image path: .png, .jpg/.jpeg or .webp; with --n > 1, images go to "
                          "NAME-0.png, NAME-1.png, ...")
    _add_engine_args(gen, many_models=False)
    gen.add_argument("--seed", type=int, default=None, help="(default: a random one, printed)")
    gen.add_argument("--steps", type=int, default=None, help="(default: the model's own)")
    gen.add_argument("--guidance", type=float, default=None, help="(default: the model's own)")
    gen.add_argument("--negative-prompt", default=None, help="(default: the model's own)")
    gen.add_argument("--size", default=None, help="WxH, one of the model's sizes (default: the model's own)")
    gen.add_argument("--n", type=int, default=1, help="images to make")
    gen.add_argument("--debug", action="store_true", help="print the traceback of a failed load")
    plan = sub.add_parser("plan", help="the memory plan of models on a GPU of a given size, from their "
                                       "configurations alone (nothing is downloaded)", formatter_class=HelpFormatter)
    plan.add_argument("--model", action="append", dest="models", metavar="SPEC",
                      help="as for serve; repeat for models served together (default: the embedded rf-shapes)")
    plan.add_argument("--device-memory", required=True, metavar="BYTES", help="80GiB, 80GB or bytes")
    plan.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                      help="the share of the device memory planned with, in (0, 1]")
    plan.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass")
    plan.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    plan.add_argument("--chat-slots", type=int, default=ChatConfig().slots_on("cuda"), metavar="N",
                      help="sequences decoded together; no chat model holds KV for more at full context")
    plan.add_argument("--chat-max-len", type=int, default=None, metavar="N",
                      help="tokens per sequence (default: the model's context)")
    plan.add_argument("--max-loras", type=int, default=None, metavar="N",
                      help="LoRA slots per model that serves adapters, as for serve (default: LoRA off)")
    plan.add_argument("--max-lora-rank", type=int, default=dl.max_rank, metavar="R", help="as for serve")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    sub.add_parser("bench", help="the latency suite (model level and HTTP level); see `rfserve bench -h`",
                   add_help=False)
    return parser
