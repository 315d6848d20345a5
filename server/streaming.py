"""Server-Sent Events: the response type, and per-output text deltas from engine progress."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from model.data.textstream import TextStream
from model.decoding.generation import TokenLogprob, TokenOutput
from model.frontend import Frontend, GenerationRequest, GenerationResult

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


@dataclass
class Update:
    """New text (and log-probabilities) of one output since the last update."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # set on the last update of the output


class OutputStreams:
    """Deltas of each of a request's outputs, from engine progress snapshots and then the final result."""

    def __init__(self, engine: Frontend, request: GenerationRequest):
        # Each output's text so far, decoded after the prompt (a first token may be a word's `##` end).
        self.decode = engine.tokenizer.continuation(request.prompt_ids)
        self.stop = request.params.stop
        self.texts: dict[int, TextStream] = {}
        self.sent_tokens: dict[int, int] = {}

    def _update(self, index: int, text: str, logprobs: list[TokenLogprob] | None, final: bool) -> Update:
        stream = self.texts.setdefault(index, TextStream(self.stop))
        start = self.sent_tokens.get(index, 0)
        new_lps = (logprobs or [])[start:]
        self.sent_tokens[index] = start + len(new_lps)
        return Update(index, stream.delta(text, final=final), new_lps)

    def progress(self, outputs: list[TokenOutput]) -> list[Update]:
        """Updates with something in them (text, or log-probabilities of new tokens)."""
        updates = [
            self._update(i, self.decode(out.tokens), out.logprobs, final=False)
            for i, out in enumerate(outputs)
        ]
        return [u for u in updates if u.text or u.logprobs]

    async def follow(
        self, events: AsyncIterator[list[TokenOutput] | Outcome]
    ) -> AsyncIterator[Update | Outcome]:
        """Over `Service.stream` events: progress updates, then each output's last update (with its
        finish reason, even if empty), then the Outcome. An ApiError of the request propagates."""
        async for item in events:
            if isinstance(item, Outcome):
                for update in self.final(item.result):
                    yield update
                yield item
                return
            for update in self.progress(item):
                yield update

    def final(self, result: GenerationResult) -> list[Update]:
        """The rest of every output, each with its finish reason."""
        updates = []
        for i, out in enumerate(result.outputs):
            update = self._update(i, out.text, out.logprobs, final=True)
            update.finish_reason = out.finish_reason
            updates.append(update)
        return updates
