"""The token-level continuous batcher for JanusFlow chat.

One thread owns a `ChatDecoder` (JanusFlow's `SlotDecoder`). Each turn of its loop:
1. drops sequences whose client left, freeing their KV rows;
2. admits waiting sequences while rows are free: prefill (image encoder + prompt) into the
   next row and choose the first token;
3. runs one decode step for every running sequence together, chooses each one's next token,
   and retires those that hit EOS, a stop string or their token budget.
So new sequences join the running batch between steps and finished ones leave at once.
Events go back through each sequence's `emit`, called on this thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rfserve.model_zoo.base import ChatDecoder
from rfserve.model_zoo.seeding import generators
from rfserve.server import faults
from rfserve.server.chat.detok import TextStream
from rfserve.server.device import DeviceTurns
from rfserve.server.chat.sampling import next_tokens

log = logging.getLogger("rfserve.chat")


class ChatQueueFull(Exception):
    pass


class ChatClosed(Exception):
    """The batcher has stopped (the server is draining or shutting down)."""


@dataclass
class ChatEvent:
    delta: str = ""
    finish_reason: str | None = None          # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    out_of_memory: bool = False               # the prefill did not fit: this request alone fails (507)


@dataclass
class TokenMetrics:
    """One model's chat token metrics (the engine passes its Prometheus children)."""
    first_token: Any                          # histogram: seconds from submit to the first token
    token_gap: Any                            # histogram: seconds between a stream's tokens
    tokens: Any                               # counter


@dataclass(eq=False)
class ChatSequence:
    ids: list[int]                            # prompt token ids, image slots expanded
    pixel_values: torch.Tensor | None         # (n_images, 3, S, S) or None
    image_positions: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[ChatEvent], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    length: int = 0                           # KV entries written
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    fault: faults.Fault | None = None         # set only under --enable-fault-injection
    submitted_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class ContinuousBatcher:
    def __init__(self, decoder: ChatDecoder, tokenizer, eos_id: int, *, max_waiting: int = 256,
                 metrics: TokenMetrics | None = None, turns: DeviceTurns | None = None):
        self.decoder, self.tokenizer, self.eos_id = decoder, tokenizer, eos_id
        self.turns = turns or DeviceTurns()       # the engine's, shared with the image worker
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.waiting: deque[ChatSequence] = deque()
        self.running: list[ChatSequence] = []     # running[i] lives in KV row i
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rfserve-chat", daemon=True)
        self.steps = 0
        self.busy_since: float | None = None      # when the running prefill/decode turn began; the watchdog reads it

    def start(self) -> "ContinuousBatcher":
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, seq: ChatSequence) -> None:
        with self._cond:
            if self._closed:
                raise ChatClosed()
            if len(self.waiting) >= self.max_waiting:
                raise ChatQueueFull()
            seq.submitted_at = time.monotonic()
            self.waiting.append(seq)
            self._cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)

    # -- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.running:
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    break
            try:
                with self.turns.turn():               # one turn: admissions, then one decode step
                    self.busy_since = time.monotonic()
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._decode_step()
            except Exception as exc:  # noqa: BLE001 — a failed step fails its sequences, not the thread
                log.exception("chat step failed")
                for seq in self.running:
                    seq.emit(ChatEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                self.running.clear()
            finally:
                self.busy_since = None
        with self._cond:
            left, self.running, self.waiting = [*self.running, *self.waiting], [], deque()
        for seq in left:
            seq.emit(ChatEvent(finish_reason="error", error="server shutting down"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self._retire([i for i, s in enumerate(self.running) if s.cancelled])

    def _admit(self) -> None:
        while len(self.running) < self.decoder.slots:
            with self._cond:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            row = len(self.running)
            self.running.append(seq)
            try:
                faults.inject_chat(seq.fault, "prefill")
                embeds = self.decoder.embed(seq.ids, seq.pixel_values, seq.image_positions)
                logits = self.decoder.prefill(row, embeds)
            except torch.OutOfMemoryError:
                self.running.pop()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("a chat prefill of %d tokens does not fit in memory", len(seq.ids))
                seq.emit(ChatEvent(finish_reason="error", out_of_memory=True,
                                   error="out of memory: this prompt does not fit on the device; send fewer "
                                         "images or a shorter conversation"))
                continue
            except Exception as exc:  # noqa: BLE001 — a bad prompt fails only itself
                self.running.pop()
                log.exception("chat prefill failed")
                seq.emit(ChatEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            seq.length = len(seq.ids)
            seq.stream = TextStream(self.tokenizer, seq.stop)
            if seq.seed is not None:
                seq.generator = generators([seq.seed])[0]
            if self._accept(seq, next_tokens(logits[None], [seq.temperature], [seq.top_p], [seq.generator])[0]):
                self._retire([row])

    def _decode_step(self) -> None:
        tokens = [s.generated[-1] for s in self.running]
        lengths = [s.length for s in self.running]
        for seq in self.running:
            faults.inject_chat(seq.fault, "decode")
        logits = self.decoder.decode(tokens, lengths)                   # (n, V)
        self.steps += 1
        running = self.running
        chosen = next_tokens(logits, [s.temperature for s in running], [s.top_p for s in running],
                             [s.generator for s in running])          # one pass, one sync, for every row
        done = []
        for i, (seq, token) in enumerate(zip(running, chosen)):
            seq.length += 1
            if self._accept(seq, token):
                done.append(i)
        self._retire(done)

    def _accept(self, seq: ChatSequence, token: int) -> bool:
        """Record one token and release its text; True when the sequence is finished."""
        seq.generated.append(token)
        self._observe(seq)
        stream = seq.stream
        assert stream is not None                 # set at admission, before the first token
        if token == self.eos_id:
            return self._finish(seq, "stop", stream.flush())
        delta, hit_stop = stream.push(token)
        if hit_stop:
            return self._finish(seq, "stop", delta)
        if len(seq.generated) >= seq.max_tokens or seq.length >= self.decoder.max_len:
            return self._finish(seq, "length", delta + stream.flush())
        if delta:
            seq.emit(ChatEvent(delta=delta))
        return False

    def _observe(self, seq: ChatSequence) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            if len(seq.generated) == 1:
                self.metrics.first_token.observe(now - seq.submitted_at)
            else:
                self.metrics.token_gap.observe(now - seq.last_token_at)
            self.metrics.tokens.inc()
        seq.last_token_at = now

    def _finish(self, seq: ChatSequence, reason: str, delta: str) -> bool:
        seq.emit(ChatEvent(delta=delta, finish_reason=reason, prompt_tokens=len(seq.ids),
                           completion_tokens=len(seq.generated)))
        return True

    def _retire(self, rows: list[int]) -> None:
        """Free rows; the last running sequence moves into each freed row."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                self.decoder.move(last, row, moved.length)
                self.running[row] = moved
            self.running.pop()
