"""Server-Sent Events: the response type, and per-output text deltas from engine progress."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from model.data.detokenizer import Update
from model.frontend import Frontend, GenerationRequest

from .service import Outcome

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str) -> bytes:
    """One event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(StreamingResponse):
    """A streaming response that always watches for the client going away, whatever the ASGI server's
    spec version, and then closes its body iterator at once: the request is cancelled and its KV slots
    freed at the next engine step, not when the next event fails to send."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    # OSError: the client is gone; the disconnect listener ends the group.
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class OutputStreams:
    """Deltas of each of a request's outputs: the updates the engine client made of its progress
    (`batching.client.EngineClient`: text made a window at a time, stop strings applied), then the
    Outcome."""

    def __init__(self, engine: Frontend, request: GenerationRequest):
        self.engine, self.request = engine, request

    async def follow(self, events: AsyncIterator[list[Update] | Outcome]) -> AsyncIterator[Update | Outcome]:
        """Over `Service.stream` events: progress updates, then each output's last update (with its
        finish reason, even if empty), then the Outcome. An ApiError of the request propagates."""
        async for item in events:
            if isinstance(item, Outcome):
                yield item
                return
            for update in item:
                yield update
