"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout", 500: "server_error", 507: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code,
                              headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _field(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first error becomes one sentence naming the field."""
    err = exc.errors()[0]
    param = _field(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return error_response(400, "request body is not valid JSON", code="invalid_json")
    if err.get("type") == "extra_forbidden":
        return error_response(400, f"unrecognized request argument: {param}", param=param,
                              code="unknown_parameter")
    if err.get("type") == "missing":
        return error_response(400, f"missing required field: {param}", param=param, code="missing")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return error_response(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()
