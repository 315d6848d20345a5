"""API-key authentication (pure ASGI, constant-time comparison)."""

from __future__ import annotations

import hmac

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import send_error
from .openapi import DOCS_PATHS
from .settings import Settings

# The API description (its pages, their assets, the schema): behind the key too, unless --no-auth-docs
# (a browser cannot send the key).
DOCS = DOCS_PATHS


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key else b""
        self.open: set[str] = set()
        self.open_docs = not settings.auth_docs
        if self.open_docs:
            self.open |= set(DOCS)
        if not settings.auth_health:
            self.open |= {"/health", "/ready"}
        if not settings.auth_metrics:
            self.open.add("/metrics")

    def _presented(self, scope: Scope) -> bytes:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return headers.get(b"x-api-key", b"").strip()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = get_route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or not self.key or path in self.open:
            await self.app(scope, receive, send)
            return
        # compare_digest takes the same time wherever the first difference is.
        if hmac.compare_digest(self._presented(scope), self.key):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "missing or invalid API key", {"www-authenticate": "Bearer"}, path)
