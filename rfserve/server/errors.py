"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "invalid_request_error", 503: "service_unavailable", 504: "timeout", 500: "server_error",
          507: "server_error"}
# A client told to come back later is told when: loading models, draining and full queues all say.
NOT_READY_RETRY_S = 5
DRAINING_RETRY_S = 1

WHY = {
    400: "A field is invalid; `error.param` names it.",
    401: "Missing or invalid API key.",
    404: "No such model or resource.",
    413: "The body is larger than the server's `--max-body-bytes`.",
    429: "The model's queue is full, or the request would not finish before its deadline.",
    499: "The client closed the connection first (recorded in metrics and logs; never received).",
    500: "The batch failed; only its own requests get this.",
    503: "Models are still loading, or the server is draining.",
    504: "The deadline passed before the answer was ready.",
    507: "Out of memory even for a single image.",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 0}}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx the API sends has this body."""
    error: ErrorBody


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code,
                              headers=self.headers)


def documented(*statuses: int) -> dict:
    """FastAPI `responses=` for these error statuses, each with the OpenAI error body."""
    out = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": WHY[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


def model_not_found(name: str, served) -> APIError:
    return APIError(404, f"model {name!r} is not served here; available: {sorted(served)}", param="model",
                    code="model_not_found")


def not_ready() -> APIError:
    return APIError(503, "models are still loading; retry shortly", code="not_ready",
                    headers={"Retry-After": str(NOT_READY_RETRY_S)})


def shutting_down(message: str = "the server is shutting down") -> APIError:
    """503 while draining: a load balancer retries on another replica, a lone client after a moment."""
    return APIError(503, message, code="shutting_down", headers={"Retry-After": str(DRAINING_RETRY_S)})


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
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
    if param is None:
        # The error is about the body itself: absent, or JSON that is not an object.
        if err.get("type") == "missing":
            return error_response(400, "request body is missing: send a JSON object with "
                                       "Content-Type: application/json", code="missing_body")
        return error_response(400, "request body must be a JSON object sent with Content-Type: application/json",
                              code="invalid_body")
    if err.get("type") == "extra_forbidden":
        return error_response(400, f"unrecognized request argument: {param}", param=param,
                              code="unknown_parameter")
    if err.get("type") == "missing":
        return error_response(400, f"missing required field: {param}", param=param, code="missing")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return error_response(400, f"{param}: {msg}", param=param, code="invalid_value")


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def http_error_handler(_: Request, exc: HTTPException) -> JSONResponse:
    """Routing errors (404, and 405 with the `Allow` header Starlette puts on it) in the OpenAI shape."""
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
