"""The token-level continuous batcher for chat, over a paged KV cache.

One thread owns a `ChatDecoder` (`model_zoo.janusflow.decoder.PagedDecoder`, for JanusFlow and Janus-Pro alike).
A running sequence holds a list of KV blocks from the decoder's pool, never a fixed row. Each turn of the loop:
1. drops sequences whose client left, giving their blocks back;
2. admits waiting sequences, in order, while fewer than `slots` run and the pool has the blocks of the whole
   prompt plus one block of headroom; their images are encoded together, in one vision forward. A prompt that
   could never fit (longer than `max_len`, or than the whole pool) fails alone as out of memory (507);
3. prefills: one forward over the admitted prompts' next chunks, at most `PREFILL_CHUNK` padded tokens in all
   (rows × longest chunk), so a long prompt is prefilled over several turns, one chunk a turn, and the running
   streams stall for at most one chunk; a sequence whose prompt is complete chooses its first token;
4. runs one decode step for every prefilled sequence, chooses each one's next token, and retires those that hit
   EOS, a stop string or their token budget. A sequence whose next position starts a block gets one first;
   when the pool is empty, the most recently admitted sequence is preempted (`_grow`).
So new sequences join the running batch between steps and finished ones leave at once. Events go back through
each sequence's `emit`, called on this thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

from rfserve.model_zoo.base import ChatDecoder
from rfserve.model_zoo.paged_kv import PromptChunk, blocks_for
from rfserve.model_zoo.seeding import generators
from rfserve.server import faults
from rfserve.server.chat.detok import TextStream
from rfserve.server.device import DeviceTurns
from rfserve.server.chat.sampling import next_tokens

log = logging.getLogger("rfserve.chat")
PREFILL_CHUNK = 2048        # padded prompt tokens one turn prefills, across its sequences
OUT_OF_MEMORY = ("out of memory: this prompt does not fit on the device; send fewer images or a shorter "
                 "conversation")


class Fit(Enum):
    NEVER = "never"                           # a prompt no pool state could hold


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
    out_of_memory: bool = False               # the prompt did not fit: this request alone fails (507)


@dataclass
class TokenMetrics:
    """One model's chat token metrics (the engine passes its Prometheus children)."""
    first_token: Any                          # histogram: seconds from submit to the first token
    token_gap: Any                            # histogram: seconds between a stream's tokens
    tokens: Any                               # counter
    preemptions: Any                          # counter


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
    blocks: list[int] = field(default_factory=list)   # its KV blocks while running: position p in blocks[p // PAGE]
    prompt_len: int = 0                       # positions to prefill: the prompt, and after a preemption its tokens
    embeds: torch.Tensor | None = None        # (prompt_len, D) until the prefill is done
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    fault: faults.Fault | None = None         # set only under --enable-fault-injection
    submitted_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prefilling(self) -> bool:
        return self.embeds is not None


class ContinuousBatcher:
    def __init__(self, decoder: ChatDecoder, tokenizer, eos_id: int, *, max_waiting: int = 256,
                 metrics: TokenMetrics | None = None, turns: DeviceTurns | None = None):
        self.decoder, self.tokenizer, self.eos_id = decoder, tokenizer, eos_id
        self.turns = turns or DeviceTurns()       # the engine's, shared with the image worker
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.waiting: deque[ChatSequence] = deque()
        self.running: list[ChatSequence] = []     # in order of admission, prefilling or decoding
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rfserve-chat", daemon=True)
        self.steps = 0
        self.preemptions = 0
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
                with self.turns.turn():               # one turn: admissions, a prefill chunk, one decode step
                    self.busy_since = time.monotonic()
                    self._drop_cancelled()
                    self._embed(self._admit())
                    self._prefill()
                    self._decode_step()
            except Exception as exc:  # noqa: BLE001 — a failed step fails its sequences, not the thread
                log.exception("chat step failed")
                for seq in self.running:
                    seq.emit(ChatEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                self._retire(list(self.running))
            finally:
                self.busy_since = None
        with self._cond:
            left, self.running, self.waiting = [*self.running, *self.waiting], [], deque()
        for seq in left:
            seq.emit(ChatEvent(finish_reason="error", error="server shutting down"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self._retire([s for s in self.running if s.cancelled])

    def _admit(self) -> list[ChatSequence]:
        """Move waiting sequences to running, in order, while their prompts' blocks are free."""
        admitted: list[ChatSequence] = []
        while len(self.running) < self.decoder.slots:
            with self._cond:
                if not self.waiting:
                    break
                seq = self.waiting[0]
                fit = self._fit(len(seq.ids) + len(seq.generated))
                if fit is not None:
                    self.waiting.popleft()
            if fit is None:
                break                             # not yet: the blocks come back as sequences finish
            if fit is Fit.NEVER:
                log.warning("a chat prompt of %d tokens can never fit the KV cache", len(seq.ids))
                seq.emit(ChatEvent(finish_reason="error", out_of_memory=True, error=OUT_OF_MEMORY))
                continue
            seq.blocks, seq.length, seq.prompt_len = fit, 0, len(seq.ids) + len(seq.generated)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _fit(self, n: int) -> list[int] | Fit | None:
        """The blocks of an n-token prompt, taken from the pool when they are free with one block to spare (so the
        running sequences can still grow); None while they are not; `Fit.NEVER` when the prompt is longer than
        `max_len` or needs more than the whole pool (the block to spare included)."""
        need, pool = blocks_for(n), self.decoder.blocks
        if n > self.decoder.max_len or need + 1 > pool.capacity:
            return Fit.NEVER
        return pool.allocate(need) if pool.free_blocks >= need + 1 else None

    def _grow(self, decoding: list[ChatSequence]) -> None:
        """Give each decoding sequence whose next position starts a block that block, oldest first. When the pool
        is empty, preempt by recompute, as vLLM does by default: the most recently admitted running sequence gives
        back all its blocks and goes to the front of the waiting queue, to be prefilled again later from its
        prompt and the tokens it has generated. It keeps its stream (tokens, text, generator, usage), so its
        client sees one uninterrupted stream, and greedy tokens are those it would have chosen unpreempted.
        A sequence alone in a pool too small for its next block ends there ("length")."""
        page, pool = self.decoder.page, self.decoder.blocks
        for seq in decoding:
            while any(s is seq for s in self.running) and seq.length >= len(seq.blocks) * page:
                block = pool.allocate(1)
                if block is not None:
                    seq.blocks += block
                    continue
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    assert seq.stream is not None
                    self._finish(seq, "length", seq.stream.flush())
                    self._retire([seq])
                    break
                self._retire([victim])
                victim.length = 0
                self.preemptions += 1
                if self.metrics is not None:
                    self.metrics.preemptions.inc()
                log.info("chat KV pool full: a sequence of %d tokens is preempted and will be recomputed",
                         len(victim.ids) + len(victim.generated))
                with self._cond:
                    self.waiting.appendleft(victim)

    def _embed(self, admitted: list[ChatSequence]) -> None:
        """The admitted prompts' embeddings, their images in one forward; where that fails, one at a time, so
        that a bad prompt fails only itself."""
        ready = []
        for seq in admitted:
            try:
                faults.inject_chat(seq.fault, "prefill")
                ready.append(seq)
            except Exception as exc:  # noqa: BLE001
                self._fail([seq], exc)
        prompts = [(s.ids + s.generated, s.pixel_values, s.image_positions) for s in ready]
        try:
            for seq, embeds in zip(ready, self.decoder.embed_many(prompts) if ready else []):
                seq.embeds = embeds
        except Exception:  # noqa: BLE001
            for seq, prompt in zip(ready, prompts):
                try:
                    seq.embeds = self.decoder.embed_many([prompt])[0]
                except Exception as exc:  # noqa: BLE001
                    self._fail([seq], exc)

    def _prefill(self) -> None:
        """One forward over the next chunk of each prefilling sequence that fits the turn's budget."""
        take: list[ChatSequence] = []
        chunks: list[PromptChunk] = []
        longest = 0
        for seq in (s for s in self.running if s.prefilling):
            size = min(seq.prompt_len - seq.length, PREFILL_CHUNK)
            if take and (len(take) + 1) * max(longest, size) > PREFILL_CHUNK:
                break
            assert seq.embeds is not None
            take.append(seq)
            chunks.append(PromptChunk(seq.embeds[seq.length:seq.length + size], seq.length, seq.blocks))
            longest = max(longest, size)
        if not take:
            return
        try:
            logits = self.decoder.prefill(chunks)                      # (n, V)
        except Exception as exc:  # noqa: BLE001 — a prompt that fails fails only the prompts in its forward
            self._fail(take, exc)
            return
        done = []
        for i, (seq, chunk) in enumerate(zip(take, chunks)):
            seq.length += chunk.embeds.shape[0]
            if seq.length == seq.prompt_len:
                seq.embeds = None
                done.append(i)
                if seq.stream is None:            # its first admission (a preempted one keeps its stream)
                    seq.stream = TextStream(self.tokenizer, seq.stop)
                    if seq.seed is not None:
                        seq.generator = generators([seq.seed])[0]
        ready = [take[i] for i in done]
        chosen = next_tokens(logits[done], [s.temperature for s in ready], [s.top_p for s in ready],
                             [s.generator for s in ready]) if done else []
        self._retire([s for s, token in zip(ready, chosen) if self._accept(s, token)])

    def _decode_step(self) -> None:
        self._grow([s for s in self.running if not s.prefilling])
        running = [s for s in self.running if not s.prefilling]
        if not running:
            return
        for seq in running:
            faults.inject_chat(seq.fault, "decode")
        logits = self.decoder.decode([s.generated[-1] for s in running], [s.length for s in running],
                                     [s.blocks for s in running])          # (n, V)
        self.steps += 1
        chosen = next_tokens(logits, [s.temperature for s in running], [s.top_p for s in running],
                             [s.generator for s in running])          # one pass, one sync, for every row
        done = []
        for seq, token in zip(running, chosen):
            seq.length += 1
            if self._accept(seq, token):
                done.append(seq)
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

    def _fail(self, seqs: list[ChatSequence], exc: Exception) -> None:
        """Fail these sequences alone: out of memory as such (507), any other error as itself."""
        if isinstance(exc, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("a chat prefill of %d prompt(s) does not fit in memory", len(seqs))
            event = ChatEvent(finish_reason="error", out_of_memory=True, error=OUT_OF_MEMORY)
        else:
            log.error("chat prefill failed", exc_info=exc)
            event = ChatEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}")
        for seq in seqs:
            seq.emit(event)
        self._retire(seqs)

    def _retire(self, seqs: list[ChatSequence]) -> None:
        """Take these sequences out of the running batch and give their blocks back."""
        gone = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in gone]
        for seq in seqs:
            self.decoder.blocks.free(seq.blocks)
            seq.blocks, seq.embeds = [], None
