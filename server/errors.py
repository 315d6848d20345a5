"""Errors as JSON `{"error": {"type", "message"}}` (under /v1/: OpenAI's `{"error": {"message", "type",
"param", "code"}}`, with 400 for invalid input), and the request-body size cap."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from types import MappingProxyType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

TYPES = MappingProxyType(
    {
        400: "invalid_request",
        401: "unauthorized",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        422: "invalid_parameter",
        429: "queue_full",
        499: "client_closed",
        500: "internal_error",
        503: "unavailable",
        504: "timeout",
    }
)


OPENAI_TYPES = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        504: "timeout_error",
    }
)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault (OpenAI's error shape names it)
        self.code = code


def error_body(
    status: int, message: str, path: str = "", param: str | None = None, code: str | None = None
) -> tuple[int, dict]:
    """(status, body): ours, or OpenAI's shape for the OpenAI-compatible routes."""
    if path.startswith("/v1/"):
        status = 400 if status == 422 else status
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
    error = {"type": TYPES.get(status, "error"), "message": message}
    if code:
        error["code"] = code  # machine-readable reason, where there is one (e.g. unsupported_task)
    return status, {"error": error}


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    path: str = "",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    status, body = error_body(status, message, path, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _field(error: dict) -> str:
    """Where a pydantic error points, without FastAPI's leading 'body' ('' for the body itself); list
    items as JSON paths write them: `questions[1]`, `messages[0].content`."""
    path = ""
    for x in error.get("loc", ()):
        if isinstance(x, int):
            path += f"[{x}]"
        elif x != "body":
            path += f".{x}" if path else str(x)
    return path


# How a route's users name our fields, where their words differ: {our field: theirs} (e.g. the OpenAI
# route's `max_tokens` for `max_new_tokens`, /vqa's `question` for the prompt). Errors use their words.
Names = Mapping[str, str]


def named(field: str, names: Names | None) -> str:
    """`field` as the user sent it on this route."""
    return (names or {}).get(field, field)


def in_users_words(message: str, names: Names | None) -> str:
    """A message that names our fields (the engine's, say) with the route's names for them."""
    if not names:
        return message
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda m: names[m[1]], message)


# Fields people send by mistake, and the one they meant.
MIX_UPS = MappingProxyType(
    {
        "img": "image",
        "file": "image",
        "picture": "image",
        "photo": "image",
        "image_url": "image",
        "imgs": "images",
        "files": "images",
        "text": "prompt or question",
        "max_tokens": "max_new_tokens",
        "beams": "num_beams",
    }
)


def _message(error: dict) -> str:
    """pydantic's message in users' words: no 'Value error, ' prefix, a hint for the usual mix-ups."""
    field, kind = _field(error), error.get("type", "")
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        hint = MIX_UPS.get(field.rsplit(".", 1)[-1])
        return f"unknown field (did you mean {hint!r}?)" if hint else "unknown field"
    if field == "image" and isinstance(error.get("input"), list):
        return "expected one image (a base64 string); send several as 'images': [...]"
    if field == "question" and isinstance(error.get("input"), list):
        return "expected one question; send several as 'questions': [...]"
    return msg


def describe_validation(errors: list[dict]) -> str:
    """'field: problem; field: problem' from pydantic's error list."""
    return "; ".join(f"{_field(e) or 'body'}: {_message(e)}" for e in errors)


def invalid(errors: list[dict], status: int = 422, names: Names | None = None) -> ApiError:
    """The error for a failed validation: every problem described, the first field named as `param`;
    `names`: the route's names for the fields, where they differ from the model's."""
    if names:
        errors = [
            {**e, "loc": tuple(named(x, names) if isinstance(x, str) else x for x in e.get("loc", ()))}
            for e in errors
        ]
    fields = [f for e in errors if (f := _field(e))]
    return ApiError(status, describe_validation(errors), param=fields[0] if fields else None)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, exc.headers, get_route_path(request.scope), exc.param, exc.code
        )

    async def _validation(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        return await _api(request, invalid(list(exc.errors())))

    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, str(exc.detail), headers, get_route_path(request.scope))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Never a stack trace in a response; it goes to the log.
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal error", None, get_route_path(request.scope))


class BodyLimit:
    """Pure ASGI middleware: 413 before reading a body whose Content-Length is over the limit, and
    while streaming one (chunked) that grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        path = get_route_path(scope)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await send_error(send, 413, f"request body is larger than {self.max_bytes} bytes", path=path)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(send, 413, f"request body is larger than {self.max_bytes} bytes", path=path)


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None, path: str = ""
) -> None:
    """The JSON error response, for pure ASGI middleware (outside FastAPI's exception handlers)."""
    status, content = error_body(status, message, path)
    body = json.dumps(content).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(StarletteHTTPException):
    """Raised from the body stream; the app's HTTP error handler turns it into the JSON 413."""
