"""OpenAI-shaped errors: the four-key object with a string code, the right status, and never internals in a body."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "server_error", 503: "server_error"}  # fmt: skip


class OpenAIError(Exception):
    """Raise anywhere in a handler to answer with this status and OpenAI error object."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _text(message), "type": _TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else _text(param), "code": code}}  # fmt: skip


def _text(value: str) -> str:
    """Echoed request data may hold lone surrogates (JSON "\\ud800"), which UTF-8 cannot encode: a body that fails
    to render would turn a 4xx into a 500 or a reset connection."""
    return value.encode("utf-8", "replace").decode("utf-8")


# Anthropic's error types (the Messages API's routes answer in its shape).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}  # fmt: skip
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """Anthropic's error object, which has no parameter field: the message names it instead."""
    text = message if param is None or param in message else f"{param}: {message}"
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "invalid_request_error"),
                                       "message": _text(text)}}  # fmt: skip


def error_response(error: OpenAIError, path: str = "") -> JSONResponse:
    """The error in the shape of the API at `path`."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    if error.status >= 500:
        headers["x-should-retry"] = "false" if error.retry_after is None else "true"
    anthropic = path.startswith(ANTHROPIC_PREFIX)
    body = anthropic_body(error.status, error.message, error.param) if anthropic else error.body()
    return JSONResponse(body, status_code=error.status, headers=headers)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem, as `param: message`, from FastAPI's 422 details."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Our validators raise protocol.InvalidParameter, which names the parameter and carries the whole message.
    if (error := (first.get("ctx") or {}).get("error")) is not None and getattr(error, "param", None):
        return str(error), error.param
    # Union members add their type names to the location ("prompt.list[int].0"); keep the field path only.
    parts = [str(p) for p in first.get("loc", ())[1:] if not (isinstance(p, str) and _is_type_name(p))]
    param = ".".join(parts) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def _is_type_name(part: str) -> bool:
    return part in _TYPE_NAMES or "[" in part or "-" in part


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(OpenAIError(400, message, "invalid_request", param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "content_too_large"}.get(
            exc.status_code, "invalid_request"
        )
        return error_response(OpenAIError(exc.status_code, str(exc.detail), code), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path, exc_info=exc)
        return error_response(OpenAIError(500, "internal server error", "internal_error"), request.url.path)
