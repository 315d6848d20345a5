"""The app's pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints):
the access log and request metrics (`Observe`), the 503 while the model loads (`UntilStarted`), and the
path prefix behind a proxy (`RootPath`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from starlette._utils import get_route_path
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import send_error
from .routes import concrete_routes
from .service import Service, elapsed_ms

log = logging.getLogger("blipserve")


# What answers while the model loads (and the API description, wherever its assets live).
OPEN_WHILE_STARTING = ("/health", "/ready", "/metrics", "/version", "/openapi.json", "/redoc")
WARM_UP_WAIT_S = 30.0  # how long a request waits for a start-up with the model loaded, before a 503


class UntilStarted:
    """Pure ASGI middleware: a 503 (Retry-After) for the routes that need the model, until it is loaded."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = get_route_path(scope) if scope["type"] == "http" else ""
        state = scope["app"].state if scope["type"] == "http" else None
        if state is None or path in OPEN_WHILE_STARTING or path.startswith("/docs"):
            await self.app(scope, receive, send)
            return
        started: asyncio.Event | None = getattr(state, "started", None)
        soon = started is not None and (state.engine_up or state.engine_loaded())
        if getattr(state, "service", None) is None and soon:  # ready in a moment: wait, not a 503
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(started.wait(), WARM_UP_WAIT_S)
        if getattr(state, "service", None) is not None:
            await self.app(scope, receive, send)
            return
        await send_error(send, 503, "the model is loading; retry later", {"Retry-After": "5"}, path)


class RootPath:
    """Pure ASGI middleware: the prefix a reverse proxy serves us under (--root-path), as the ASGI
    `root_path`: routes match with or without it, the OpenAPI schema and /docs name it."""

    def __init__(self, app: ASGIApp, root_path: str):
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


def route_template(scope: Scope) -> str:
    """The path template of the route `scope` asks for (`/v1/models/{model_id}`), or "unmatched": a
    bounded label set for the metrics, whatever paths clients send."""
    partial = None
    for route in concrete_routes(scope["app"].router.routes):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
        if match == Match.PARTIAL and partial is None:  # the path, with another method (405)
            partial = getattr(route, "path", None)
    return partial or "unmatched"


class Observe:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints): a
    request id on every response and in the access log (but for `exclude`d paths), and every request
    counted with its latency, by route template and status."""

    def __init__(self, app: ASGIApp, exclude: list[str] | None = None):
        self.app = app
        self.exclude = frozenset(exclude or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = get_route_path(scope)
            svc: Service | None = getattr(scope["app"].state, "service", None)
            if svc is not None:
                svc.lifecycle.record_http(route_template(scope), status, time.perf_counter() - start)
            if path not in self.exclude:
                ms, method = elapsed_ms(start), scope.get("method")
                client = (scope.get("client") or ("", 0))[0]
                extra = {"request_id": request_id, "method": method, "path": path, "status": status}
                extra.update(duration_ms=ms, client=client)
                trace_id = scope["state"].get("trace_id")  # set by TraceRequests when tracing is on
                if trace_id:
                    extra["trace_id"] = trace_id
                trace = f" trace={trace_id}" if trace_id else ""
                log.info("%s %s %s %.1fms id=%s%s", method, path, status, ms, request_id, trace, extra=extra)
