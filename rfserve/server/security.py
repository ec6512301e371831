"""API keys and model-root confinement.

Keys are checked on the raw ASGI request, before the body is read or anything is
queued. /health and /ready stay open for orchestrators; /metrics is open unless
`protect_metrics` is set; the playground page itself is open (it asks for the key).
"""
from __future__ import annotations

import hmac
from pathlib import Path

from rfserve.model_zoo.loading import CheckpointError
from rfserve.server.errors import Code, error_response

OPEN_PATHS = ("/health", "/ready", "/", "/playground", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def is_open(path: str, protect_metrics: bool) -> bool:
    """Whether `path` is served without a key."""
    if path == "/metrics":
        return not protect_metrics
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def load_keys(keys: list[str], key_file: str | None) -> list[str]:
    found = [k.strip() for k in keys if k.strip()]
    if key_file:
        lines = Path(key_file).read_text().splitlines()
        found += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return found


class APIKeyMiddleware:
    def __init__(self, app, keys: list[str], protect_metrics: bool = False):
        self.app, self.keys = app, [k.encode() for k in keys]
        self.protect_metrics = protect_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or is_open(scope["path"], self.protect_metrics):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys):
            return await self.app(scope, receive, send)
        message = "missing API key: send Authorization: Bearer <key>" if not header else "invalid API key"
        refusal = error_response(Code.INVALID_API_KEY, message, headers={"WWW-Authenticate": "Bearer"})
        await refusal(scope, receive, send)


def confine(source: str, model_root: str | None) -> str:
    """With a model root, local sources resolve inside it (relative ones against it);
    anything that escapes, by `..` or a symlink, is refused. Hub ids pass unchanged."""
    if not model_root:
        return source
    root = Path(model_root).resolve()
    candidate = Path(source).expanduser()
    candidate = candidate if candidate.is_absolute() else root / candidate
    if not candidate.exists():
        if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1:
            raise CheckpointError(f"{source}: no such folder under the model root {root}")
        return source
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(f"{source}: resolves outside the model root {root}")
    return str(resolved)
