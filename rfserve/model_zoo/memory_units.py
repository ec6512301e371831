"""Byte sizes as flags write them. Apart from `memory_plan` so that the CLI refuses a bad size before it
imports torch and the model libraries (seconds)."""
from __future__ import annotations

import re

GiB = 2 ** 30
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|G|MiB|MB|M)?\s*$", re.IGNORECASE)
UNITS = {"gib": 2 ** 30, "g": 2 ** 30, "gb": 10 ** 9, "mib": 2 ** 20, "m": 2 ** 20, "mb": 10 ** 6, "": 1}


def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """'80GiB' or '80G' (2**30 each), '80GB' (10**9), '512MiB', '512MB', or plain bytes."""
    m = SIZE.match(str(text))
    if not m:
        raise ValueError(f"{flag}: expected a size such as 80GiB, 80GB or 85899345920, got {text!r}")
    value = int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise ValueError(f"{flag}: must be more than 0 bytes, got {text!r}")
    return value
