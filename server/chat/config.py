"""Chat settings. They come from the environment so the chat route needs no new CLI flags:

| variable | default | meaning |
|---|---|---|
| RFSERVE_CHAT_SLOTS | 32 on CUDA, 4 on CPU | sequences decoded together (KV slots preallocated) |
| RFSERVE_CHAT_MAX_LEN | the model's context | tokens per slot (prompt + completion) |
| RFSERVE_CHAT_MAX_WAITING | 256 | sequences queued for a slot before 429 |
| RFSERVE_CHAT_MAX_IMAGES | 4 | image parts per request |
| RFSERVE_CHAT_MAX_IMAGE_PIXELS | 16777216 | width·height cap, checked before decoding |
| RFSERVE_CHAT_IMAGE_HOSTS | (empty: remote URLs off) | comma-separated hosts whose http(s) image URLs may be fetched |
| RFSERVE_CHAT_DEFAULT_MAX_TOKENS | 512 | completion budget when the request sets none |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class ChatConfig:
    slots: int
    max_len: int | None = None
    max_waiting: int = 256
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 << 20
    image_hosts: frozenset[str] = field(default_factory=frozenset)
    default_max_tokens: int = 512

    @classmethod
    def from_env(cls, on_cuda: bool) -> "ChatConfig":
        hosts = os.environ.get("RFSERVE_CHAT_IMAGE_HOSTS", "")
        max_len = _int("RFSERVE_CHAT_MAX_LEN", 0)
        return cls(slots=_int("RFSERVE_CHAT_SLOTS", 32 if on_cuda else 4), max_len=max_len or None,
                   max_waiting=_int("RFSERVE_CHAT_MAX_WAITING", 256),
                   max_images=_int("RFSERVE_CHAT_MAX_IMAGES", 4),
                   max_image_pixels=_int("RFSERVE_CHAT_MAX_IMAGE_PIXELS", 4096 * 4096),
                   image_hosts=frozenset(h.strip().lower() for h in hosts.split(",") if h.strip()),
                   default_max_tokens=_int("RFSERVE_CHAT_DEFAULT_MAX_TOKENS", 512))
