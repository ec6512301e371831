"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, with `code` one of `Code`."""
from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error", 503: "service_unavailable", 504: "timeout",
          500: "server_error", 507: "server_error"}
# A client told to come back later is told when: loading models, draining and full queues all say.
NOT_READY_RETRY_S = 5
DRAINING_RETRY_S = 1


class Code(StrEnum):
    """Every `error.code` the API sends: one per kind of error, each with its one status. A client can branch
    on it, so it is never null and never changes with the wording. An error is built from its code (the
    status comes from here), the OpenAPI document publishes this list as the enum of `code`, and a test holds
    README's error table to it, so the codes sent, documented and published cannot drift apart."""
    status: int
    when: str

    def __new__(cls, value: str, status: int, when: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.status, member.when = status, when
        return member

    INVALID_JSON = "invalid_json", 400, "the body is not valid JSON"
    MISSING_BODY = "missing_body", 400, "a JSON route got no body"
    INVALID_BODY = "invalid_body", 400, "the body is not a JSON object, or is a form that does not parse"
    UNKNOWN_PARAMETER = "unknown_parameter", 400, "a field the route does not take (`param` names it)"
    MISSING_REQUIRED_PARAMETER = "missing_required_parameter", 400, "a required field is absent (`param` names it)"
    INVALID_VALUE = "invalid_value", 400, ("a field's value is not allowed: wrong type, out of range (NaN and "
                                           "infinity included), not one of the choices, or not for this model")
    INVALID_IMAGE = "invalid_image", 400, ("an image sent (an edit's `image` or `mask`, a chat image part) "
                                           "cannot be used: not decodable, too large, empty, or a mask that "
                                           "does not fit the image")
    INVALID_IMAGE_URL = "invalid_image_url", 400, ("a chat image URL is not a data: URL or an allowed host's, "
                                                   "or fetching it failed")
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded", 400, "the chat prompt plus `max_tokens` exceeds the context"
    UNSUPPORTED_MODEL = "unsupported_model", 400, "the model is served but does not do this (chat, edits)"
    INVALID_API_KEY = "invalid_api_key", 401, "the API key is missing or wrong"
    MODEL_NOT_FOUND = "model_not_found", 404, "no such model is served"
    IMAGE_NOT_FOUND = "image_not_found", 404, "a `url` result that is unknown or has expired"
    LORA_NOT_FOUND = "lora_not_found", 404, "no LoRA adapter of that name is loaded (DELETE /v1/loras/NAME)"
    NOT_FOUND = "not_found", 404, "no such route or file"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, ("the route exists but not for this method; `Allow` lists "
                                                     "the methods it takes")
    LORA_EXISTS = "lora_exists", 409, "a LoRA adapter of that name is loaded, loading or unloading already"
    BODY_TOO_LARGE = "body_too_large", 413, "the body is larger than `--max-body-bytes`"
    QUEUE_FULL = "queue_full", 429, ("the model's queue is full, or the work queued ahead would keep the request "
                                     "past its deadline; `Retry-After` says when to retry")
    CLIENT_CLOSED = "client_closed", 499, "the client left first (in logs and metrics only; never received)"
    GENERATION_FAILED = "generation_failed", 500, "the batch failed; only its own requests get this"
    NOT_READY = "not_ready", 503, "the models are still loading; `Retry-After` says when to retry"
    SHUTTING_DOWN = "shutting_down", 503, "the server is draining; `Retry-After` says when to retry"
    DEADLINE_EXCEEDED = "deadline_exceeded", 504, "the deadline passed before the answer was ready"
    DEADLINE_UNMEETABLE = "deadline_unmeetable", 504, ("refused at once: the request's own images take longer "
                                                       "than its deadline at the model's recent rate, even with "
                                                       "nothing queued; a longer `timeout` helps, a retry does not")
    OUT_OF_MEMORY = "out_of_memory", 507, "out of memory even for a single image"


WHY = {
    400: "A field is invalid; `error.param` names it.",
    401: "Missing or invalid API key.",
    404: "No such model or resource.",
    409: "The resource exists already.",
    413: "The body is larger than the server's `--max-body-bytes`.",
    429: "The model's queue is full, or the work queued ahead would keep the request past its deadline.",
    499: "The client closed the connection first (recorded in metrics and logs; never received).",
    500: "The batch failed; only its own requests get this.",
    503: "Models are still loading, or the server is draining.",
    504: "The deadline passed, or the request's own images would take longer than its deadline.",
    507: "Out of memory even for a single image.",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 0}}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: Code


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx the API sends has this body."""
    error: ErrorBody


class APIError(Exception):
    def __init__(self, code: Code, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.status = code.status
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.code, self.message, param=self.param, headers=self.headers)


def describe(status: int) -> str:
    """The OpenAPI description of an error status: why it comes, and the codes it carries."""
    codes = ", ".join(f"`{code}`" for code in Code if code.status == status)
    return f"{WHY[status]} `error.code`: {codes}."


def documented(*statuses: int) -> dict:
    """FastAPI `responses=` for these error statuses, each with the OpenAI error body."""
    out = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": describe(status)}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


def model_not_found(name: str, served) -> APIError:
    return APIError(Code.MODEL_NOT_FOUND, f"model {name!r} is not served here; available: {sorted(served)}",
                    param="model")


def not_ready() -> APIError:
    return APIError(Code.NOT_READY, "models are still loading; retry shortly",
                    headers={"Retry-After": str(NOT_READY_RETRY_S)})


def shutting_down(message: str = "the server is shutting down") -> APIError:
    """503 while draining: a load balancer retries on another replica, a lone client after a moment."""
    return APIError(Code.SHUTTING_DOWN, message, headers={"Retry-After": str(DRAINING_RETRY_S)})


def error_response(code: Code, message: str, *, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one place an error body is built; the ASGI middlewares (keys, body cap) send it too."""
    body = {"error": {"message": message, "type": _TYPES[code.status], "param": param, "code": code}}
    return JSONResponse(jsonable_encoder(body), status_code=code.status, headers=headers)


def _field(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first error becomes one sentence naming the field."""
    err = exc.errors()[0]
    param = _field(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return error_response(Code.INVALID_JSON, "request body is not valid JSON")
    if param is None:
        # The error is about the body itself: absent, or JSON that is not an object.
        if err.get("type") == "missing":
            return error_response(Code.MISSING_BODY, "request body is missing: send a JSON object with "
                                                     "Content-Type: application/json")
        return error_response(Code.INVALID_BODY,
                              "request body must be a JSON object sent with Content-Type: application/json")
    if err.get("type") == "extra_forbidden":
        return error_response(Code.UNKNOWN_PARAMETER, f"unrecognized request argument: {param}", param=param)
    if err.get("type") == "missing":
        return error_response(Code.MISSING_REQUIRED_PARAMETER, f"missing required field: {param}", param=param)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return error_response(Code.INVALID_VALUE, f"{param}: {msg}", param=param)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


# The errors Starlette raises itself: a form that does not parse, no route, a wrong method, and the body cap
# that server/limits.py enforces while the body streams in.
_STARLETTE_CODES = {400: Code.INVALID_BODY, 404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED,
                    413: Code.BODY_TOO_LARGE}


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's errors in the OpenAI shape; a 405's `Allow` names every method of its path, and says it."""
    code, headers = _STARLETTE_CODES[exc.status_code], exc.headers
    message = str(exc.detail)
    if code is Code.NOT_FOUND:
        message = f"{request.url.path} not found"
    elif code is Code.METHOD_NOT_ALLOWED:
        headers = {**(exc.headers or {}), "Allow": _allowed(request, (exc.headers or {}).get("Allow", ""))}
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
    return error_response(code, message, headers=headers)


def _allowed(request: Request, first: str) -> str:
    """Every method of the routes at this path: Starlette names only the first route's, and a path may have a
    route per method (GET and POST /v1/loras)."""
    path = request.url.path
    methods = {m for r in request.app.routes if getattr(r, "methods", None) and r.path_regex.match(path)
               for m in r.methods}
    return ", ".join(sorted(methods)) if methods else first
