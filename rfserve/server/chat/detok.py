"""Incremental detokenisation with stop strings.

Text is released as soon as it is final: a token that ends in the middle of a UTF-8 character
is held until the character completes (the decoded window ends in U+FFFD), and text that could
still become a stop string is held until it cannot. Streaming and non-streaming responses are
both the concatenation of these deltas, so they are equal by construction.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.pending = ""          # decoded, not yet released (could start a stop string)
        self.text = ""             # released so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (newly released text, whether a stop string was hit)."""
        self.ids.append(token)
        if not self._advance(final=False):
            return "", False
        hit = self._first_stop()
        if hit is not None:
            return self._release(self.pending[:hit]), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        return self._release(self.pending[:cut], keep=self.pending[cut:]), False

    def flush(self) -> str:
        """At the end of generation, release everything left, incomplete characters included."""
        self._advance(final=True)
        hit = self._first_stop()
        return self._release(self.pending if hit is None else self.pending[:hit])

    def _advance(self, final: bool) -> bool:
        """Move newly decodable text into `pending`."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) <= len(before) or (window.endswith("\ufffd") and not final):
            return False
        self.pending += window[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return True

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, out: str, keep: str = "") -> str:
        self.pending = keep
        self.text += out
        return out
