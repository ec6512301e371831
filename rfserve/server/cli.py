"""`rfserve serve`, `rfserve generate` and `rfserve plan`."""
from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rfserve.model_zoo.loading import CheckpointError
from rfserve import __version__
from rfserve.server.chat.config import INT_SETTINGS, ChatConfig
from rfserve.server.cli_args import build_parser
from rfserve.server.config import LoraConfig, ServerConfig

if TYPE_CHECKING:
    from rfserve.server.sources import LoadError

# What the first-run banner's curl line asks for: a prompt every model draws something sensible for.
TRY_PROMPT = "a red circle on a blue background"


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _fail(message: str) -> NoReturn:
    print(f"rfserve: error: {message}", file=sys.stderr)
    sys.exit(2)


def _memory_flags(args) -> tuple[float, int | None]:
    """--gpu-memory-utilization and --device-memory, checked before any model library is imported."""
    from rfserve.model_zoo.memory_units import parse_bytes

    if not 0 < args.gpu_memory_utilization <= 1:
        _fail(f"--gpu-memory-utilization: must be in (0, 1], got {args.gpu_memory_utilization}")
    try:
        return args.gpu_memory_utilization, (None if args.device_memory is None else parse_bytes(args.device_memory))
    except ValueError as err:
        _fail(str(err))


def plan(args) -> None:
    """Print the memory plan; exit 1 with one line on stderr when it does not fit."""
    utilization, device_memory = _memory_flags(args)
    for flag, value in (("--max-batch", args.max_batch), ("--chat-slots", args.chat_slots),
                        ("--chat-max-len", args.chat_max_len)):
        if value is not None and value < 1:
            _fail(f"{flag}: must be at least 1, got {value}")
    try:                                # a request combines the serve default's adapters, or all the slots
        lora = None if args.max_loras is None else LoraConfig(
            slots=args.max_loras, max_rank=args.max_lora_rank, per_request=min(LoraConfig.per_request, args.max_loras))
    except ValueError as err:
        _fail(str(err))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # configurations only: never a download
    _quiet_libraries()
    import torch

    from rfserve.model_zoo.memory_plan import plan_memory

    result = plan_memory(args.models or ["rf-shapes"], device_memory=int(device_memory or 0),
                         utilization=utilization, max_batch=args.max_batch, dtype=getattr(torch, args.dtype),
                         max_seqs=args.chat_slots, max_len=args.chat_max_len,
                         lora=None if lora is None else lora.pool(args.max_batch))
    print(json.dumps(result.to_json()) if args.json else result.table(), flush=True)
    if not result.fits:
        print(f"rfserve: the plan does not fit: {result.problem}", file=sys.stderr)
        sys.exit(1)


def _fail_loading(err: LoadError, debug: bool) -> NoReturn:
    """One line for a model that did not load; its traceback only when asked for."""
    if debug and err.__cause__ is not None:
        traceback.print_exception(err.__cause__)
    _fail(str(err))


def _sources(models: list[str], model_root: str | None, debug: bool) -> dict[str, Path]:
    """The checkpoint folders, found before the model libraries' seconds of imports (server.sources)."""
    from rfserve.server.sources import LoadError, find_sources, model_specs

    try:
        return find_sources(model_specs(models, model_root))     # a bad SPEC's CheckpointError: main's one line
    except LoadError as err:
        _fail_loading(err, debug)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model loads: a busy or forbidden address then fails in a
    second, not after minutes of loading and warming (where uvicorn's own bind aborted the process)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds; a live listener still wins
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        _fail(f"cannot listen on {host}:{port}: {err.strerror or err}")
    return sock


def serve(args) -> None:
    from rfserve.server.security import load_keys

    try:
        keys = load_keys(args.api_key, args.api_key_file)
    except OSError as err:
        _fail(f"--api-key-file: {err}")
    utilization, device_memory = _memory_flags(args)
    sock = listen(args.host, args.port)
    debug = args.debug or args.log_level.lower() == "debug"
    sources = _sources(args.models or ["rf-shapes"], args.model_root, debug)
    _quiet_libraries()                  # the model libraries' seconds of imports come after the quick refusals
    from rfserve.server.app import create_app
    from rfserve.server.engine import Engine, LoadError
    from rfserve.server.lifecycle import DrainingServer, Watchdog

    config = ServerConfig(models=args.models or ["rf-shapes"], host=args.host, port=args.port,
                          device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, continuous=args.continuous == "on",
                          max_queue=args.max_queue, max_steps=args.max_steps, request_timeout_s=args.request_timeout,
                          max_request_timeout_s=args.max_request_timeout,
                          shutdown_grace_s=args.shutdown_grace, watchdog_s=args.watchdog_timeout,
                          max_body_bytes=args.max_body_bytes,
                          max_input_pixels=args.max_input_pixels, warmup=not args.no_warmup,
                          fault_injection=args.enable_fault_injection, log_prompts=args.log_prompts,
                          api_keys=keys, protect_metrics=args.protect_metrics, model_root=args.model_root,
                          cors_origins=args.cors_origin, compile=args.compile, compile_mode=args.compile_mode,
                          batch_buckets=_buckets(args.batch_buckets), cpu_threads=args.cpu_threads,
                          gpu_memory_utilization=utilization, device_memory=device_memory,
                          chat=_chat_config(args), lora=_lora_config(args))
    engine = Engine(config, sources=sources)
    uv_config = uvicorn_config(create_app(engine), config, args.log_level)
    server = DrainingServer(uv_config, engine, grace_s=config.shutdown_grace_s)
    watchdog = Watchdog(engine, config.watchdog_s)
    failure: list[LoadError] = []

    def load() -> None:
        try:
            engine.load(progress=True)
            watchdog.start()
        except LoadError as err:
            failure.append(err)
            engine.load_error = str(err)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:    # /ready answers once uvicorn listens
            time.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(banner(config, [s.name for s in engine.specs], engine.device.type, port), flush=True)

    threading.Thread(target=load, name="rfserve-loader", daemon=True).start()
    server.run(sockets=[sock])
    watchdog.stop()
    engine.shutdown()
    if failure:
        _fail_loading(failure[0], debug)
    if engine.compiling_in_background:
        _exit_during_compile()


def _exit_during_compile() -> NoReturn:
    """Exit 0 while the CPU's background compile still runs. It cannot be interrupted, and the interpreter's
    teardown under it aborts the process (a C++ thread still joinable). Every request has its answer by now,
    and what inductor finished is cached for the next start."""
    logging.getLogger("rfserve.cli").info("exiting during the background compile; the next start resumes it")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def banner(config: ServerConfig, models: list[str], device: str, port: int) -> str:
    """What a first run needs once /ready is true: where the playground is, and one request that works."""
    host = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else config.host
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    body = json.dumps({"model": models[0], "prompt": TRY_PROMPT, "seed": 7})
    auth = ' -H "authorization: Bearer $RFSERVE_API_KEY"' if config.api_keys else ""
    save = ("python3 -c 'import sys,json,base64; "
            "open(\"out.png\",\"wb\").write(base64.b64decode(json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))'")
    lines = [f"rfserve {__version__} is ready: {', '.join(models)} on {device}",
             f"  playground: {base}/",
             f"  try it:     curl -s {base}/v1/images/generations{auth} -H 'content-type: application/json' "
             f"-d {shlex.quote(body)} | {save}"]
    if config.api_keys:
        lines.append("              (with RFSERVE_API_KEY set to one of the server's keys)")
    return "\n".join(lines)


def _chat_config(args) -> ChatConfig:
    flags = {name: getattr(args, f"chat_{name}") for name, _, _ in INT_SETTINGS}
    try:
        return ChatConfig.resolve(flags, args.chat_image_host)
    except ValueError as err:
        _fail(str(err))


def _lora_config(args) -> LoraConfig:
    """The LoRA flags, refused in one line before any model loads."""
    from rfserve.server.adapters import parse_lora

    names = []
    for text in args.lora:
        try:
            names.append(parse_lora(text).name)
        except ValueError as err:
            _fail(str(err))
    if len(set(names)) != len(names):
        _fail(f"--lora: an adapter name is given twice: {names}")
    try:
        return LoraConfig(enabled=args.enable_lora, adapters=args.lora, slots=args.max_loras,
                          max_rank=args.max_lora_rank, per_request=args.max_loras_per_request)
    except ValueError as err:
        _fail(str(err))


def _buckets(text: str) -> tuple[int, ...]:
    try:
        buckets = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        _fail(f"--batch-buckets: expected comma-separated integers, got {text!r}")
    if not buckets or buckets[0] < 1:
        _fail("--batch-buckets: sizes must be positive")
    return buckets


def uvicorn_config(app, config: ServerConfig, log_level: str):
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                          timeout_graceful_shutdown=int(config.shutdown_grace_s) + 30)


# The formats `rfserve generate` writes, by the output's suffix (JPEG at quality 90).
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# `rfserve generate`'s flag for each request field the spec builder may refuse.
GENERATE_FLAGS = {"n": "--n", "size": "--size", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
                  "negative_prompt": "--negative-prompt"}


def generate(args) -> None:
    if args.output.suffix.lower() not in SUFFIX_FORMATS:
        _fail(f"-o: cannot write {args.output.suffix or 'a file without a suffix'}; "
              f"use one of {', '.join(SUFFIX_FORMATS)}")
    sources = _sources(args.models or ["rf-shapes"], None, args.debug)
    _quiet_libraries()                  # the model libraries' seconds of imports come after the quick refusals
    from rfserve.server.encoding import image_bytes
    from rfserve.server.engine import Engine, LoadError
    from rfserve.server.errors import APIError
    from rfserve.server.specs import image_specs

    config = ServerConfig(models=args.models or ["rf-shapes"], device=args.device, dtype=args.dtype,
                          warmup=False, max_batch=max(1, args.n))
    engine = Engine(config, sources=sources)
    try:
        engine.load(progress=True)
    except LoadError as err:
        _fail_loading(err, args.debug)
    try:
        card = next(iter(engine.cards.values()))
        try:
            specs = image_specs(card, args.prompt, max_n=args.n, n=args.n,
                                size=None if args.size is None else args.size.lower(), steps=args.steps,
                                guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt)
        except APIError as err:
            _fail(f"{GENERATE_FLAGS.get(err.param or '', err.param)}: {err.message}")
        result = engine.submit(card.name, specs).future.result()
    finally:
        engine.shutdown()
    paths = [args.output] if args.n == 1 else [
        args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}") for i in range(args.n)]
    for path, image, spec in zip(paths, result.images, specs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(image, SUFFIX_FORMATS[path.suffix.lower()], 90))
        print(f"{path} (seed {spec.seed})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        try:
            from rfserve.benchmarks.suite import main as bench
        except ModuleNotFoundError as err:
            _fail(f"rfserve bench needs the bench extra ({err.name} is not installed): pip install 'rfserve[bench]'")

        bench(argv[1:])
        return
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        {"serve": serve, "generate": generate, "plan": plan}[args.command](args)
    except CheckpointError as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
