"""Start `rfserve serve` as a subprocess on 127.0.0.1 and wait for /ready; the official
client for it, and PNG decoding of its answers."""
from __future__ import annotations

import base64
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import httpx
import numpy as np
from openai import OpenAI
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_fixed_port(low: int = 20000, high: int = 32000) -> int:
    """A free port below Linux's ephemeral range, for servers that start many processes:
    their own ephemeral binds can then never take it before the server listens."""
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


class ServerProcess:
    def __init__(self, *args: str, ready_timeout: float = 300.0):
        """`rfserve serve` with `args`. It serves eagerly unless they name `--compile`: on the CPU the default
        compiles after ready, for a minute or more of both cores, beside the test's own requests."""
        if "--compile" not in args:
            args = (*args, "--compile", "off")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rfserve.server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of one metric whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def openai_client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def decode_png(b64: str) -> np.ndarray:
    """A `b64_json` image as (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def watchdog_trips_then_recovers(url: str, hang: Callable[[], object], trip_after_s: float) -> None:
    """Run `hang` (work that stalls the device past a 2 s `--watchdog-timeout`) on a thread: `/health` is 503,
    naming the stall, `trip_after_s` later, and 200 again once the work is done."""
    assert httpx.get(f"{url}/health").status_code == 200
    hung = threading.Thread(target=hang)
    hung.start()
    time.sleep(trip_after_s)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and "over 2s" in health.json()["error"]
    hung.join()
    time.sleep(1.0)
    assert httpx.get(f"{url}/health").status_code == 200
