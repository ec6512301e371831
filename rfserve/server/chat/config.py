"""Chat settings. Each is a `rfserve serve` flag, `--chat-<name>` (INT_SETTINGS says what each means); a
flag not given falls back to its RFSERVE_CHAT_* variable, for deployments configured that way, then to
the default. `--chat-image-host` (repeatable) or RFSERVE_CHAT_IMAGE_HOSTS (comma-separated) lists the
hosts whose http(s) image URLs may be fetched; with none, remote URLs are off."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# (field, variable, meaning) of the integer settings; the flag is --chat-<field with dashes>.
INT_SETTINGS = (
    ("slots", "RFSERVE_CHAT_SLOTS", "sequences decoded together (default: 32 on CUDA, 4 on CPU)"),
    ("max_len", "RFSERVE_CHAT_MAX_LEN", "tokens one sequence may hold, prompt and completion (default: the model's context)"),
    ("max_waiting", "RFSERVE_CHAT_MAX_WAITING", "sequences queued for a slot before 429 (default: 256)"),
    ("max_images", "RFSERVE_CHAT_MAX_IMAGES", "image parts per request (default: 4)"),
    ("max_image_pixels", "RFSERVE_CHAT_MAX_IMAGE_PIXELS", "width x height cap, checked before decoding "
                                                          "(default: 4096²)"),
    ("default_max_tokens", "RFSERVE_CHAT_DEFAULT_MAX_TOKENS", "completion budget when a request sets none "
                                                              "(default: 512)"),
)
HOSTS_VARIABLE = "RFSERVE_CHAT_IMAGE_HOSTS"


@dataclass(frozen=True)
class ChatConfig:
    slots: int | None = None                  # None: by device (see `slots_on`)
    max_len: int | None = None
    max_waiting: int = 256
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 << 20
    image_hosts: frozenset[str] = field(default_factory=frozenset)
    default_max_tokens: int = 512

    def slots_on(self, device_type: str) -> int:
        """Sequences one decode step runs: many on a GPU, few where each step's rows cost CPU time. The KV they share
        comes from the memory budget (server.memory), not from this number."""
        return self.slots or (32 if device_type == "cuda" else 4)

    @classmethod
    def resolve(cls, flags: dict[str, int | None], hosts: list[str]) -> "ChatConfig":
        """Flags first, then the environment, then the defaults."""
        values: dict = {}
        for name, variable, _ in INT_SETTINGS:
            raw = os.environ.get(variable, "").strip()
            if flags.get(name) is not None:
                values[name], source = flags[name], f"--chat-{name.replace('_', '-')}"
            elif raw:
                try:
                    values[name], source = int(raw), variable
                except ValueError:
                    raise ValueError(f"{variable} must be an integer, got {raw!r}") from None
            else:
                continue
            if values[name] < 1:
                raise ValueError(f"{source} must be at least 1")
        hosts = hosts or os.environ.get(HOSTS_VARIABLE, "").split(",")
        return cls(**values, image_hosts=frozenset(h.strip().lower() for h in hosts if h.strip()))
