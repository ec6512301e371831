"""A bounded, expiring store of encoded images, with their media types, for `response_format="url"`."""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict


class ImageStore:
    def __init__(self, max_items: int, ttl_s: float):
        self.max_items, self.ttl = max_items, ttl_s
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = (time.monotonic() + self.ttl, data, media_type)
            self._evict()
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, media type), or None when unknown or expired."""
        with self._lock:
            self._evict()
            item = self._items.get(key)
            return (item[1], item[2]) if item else None

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, (exp, _, _) in self._items.items() if exp <= now]:
            del self._items[key]
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
