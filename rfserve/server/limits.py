"""Request-body cap, enforced on the raw ASGI stream so an oversize body is refused
with 413 before it is buffered (Content-Length is checked first, then the bytes read)."""
from __future__ import annotations

from starlette.exceptions import HTTPException

from rfserve.server.errors import Code, error_response


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            refusal = error_response(Code.BODY_TOO_LARGE, self._message(), headers={"Connection": "close"})
            return await refusal(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException, as FastAPI passes those on from its body parsing (server/errors.py
                    # answers it with this same code); any other exception there becomes its generic 400.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body is larger than the server's limit of {self.max_bytes} bytes"
