"""The serving core held on `app.state.service`: the pieces the HTTP routes use, each with one job
(`lifecycle`: the engine from build to shutdown; `rules`: request validation and building; `images`:
image preparation), and the running of requests on the engine (queue, wait, stream, map engine
failures to HTTP errors)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from batching import EngineStopped, QueueFull
from batching.client import SequenceFailed, Ticket
from batching.engine_process import EngineHandle
from batching.process_client import EngineDied
from batching.protocol import Done
from model.data.detokenizer import Update
from model.frontend import GenerationRequest, GenerationResult
from model.runtime.plan import RetrievalOutput, RetrievalRequest

from .errors import ApiError
from .images import ImagePrep
from .lifecycle import EngineLifecycle
from .rules import RequestRules
from .settings import Settings
from .tracing import Tracing

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    result: GenerationResult
    queue_s: float


class Service:
    """What the HTTP routes use: `lifecycle` (the engine client and its start, health, metrics and
    shutdown), `rules` (a request's fields against this server and the checkpoint, and the engine
    request built from them), `images` (fetch, decode, preprocess, hash); and, its own job, running
    requests on the engine. `settings`, `engine` (the request rules' `Frontend`) and `client` (the engine
    client) are the lifecycle's."""

    def __init__(self, lifecycle: EngineLifecycle):
        self.lifecycle = lifecycle
        self.settings = lifecycle.settings
        self.engine = lifecycle.engine
        self.client = lifecycle.client
        self.client.use_tokenizer(self.engine.tokenizer)  # the text of generated tokens is made here
        self.rules = RequestRules(self.settings, self.engine)
        self.images = ImagePrep(self.settings, self.engine.image_processor)
        self._tracing: Tracing | None = None

    @classmethod
    def build(cls, settings: Settings, handle: EngineHandle | list[EngineHandle] | None = None) -> Service:
        """The service of an engine loaded here or in engine process(es): see `EngineLifecycle.build`."""
        return cls(EngineLifecycle.build(settings, handle))

    @property
    def tracing(self) -> Tracing | None:
        """Requests are traced with it (None: off); set by the app."""
        return self._tracing

    @tracing.setter
    def tracing(self, tracing: Tracing | None) -> None:
        self._tracing = tracing
        self.images.tracing = tracing

    async def start(self) -> None:
        """Start the engine (`EngineLifecycle.start`); images then go to it as its device takes them."""
        await self.lifecycle.start()
        self.images.raw_pixels = self.lifecycle.raw_pixels

    async def warm_up(self) -> None:
        """One request through every stage of the engine; ready for traffic after it."""
        await self.lifecycle.warm_up()

    async def shutdown(self) -> None:
        """Finish every accepted request, then stop the engine and the image workers."""
        await self.lifecycle.shutdown()
        self.images.close()
        log.info("engine stopped; %d requests left unfinished", self.client.pending)

    async def enqueue(self, request: GenerationRequest | RetrievalRequest, stream: bool = False) -> Ticket:
        """Queue one request now (so a full queue is a 429 before any response starts)."""
        if not self.lifecycle.ready:
            raise ApiError(503, "model is not ready", {"Retry-After": "1"})
        try:
            trace = self.tracing is not None and self.tracing.recording()
            return await self.client.add(request, self.settings.request_timeout_s, stream, trace)
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", {"Retry-After": "1"}) from None
        except (EngineStopped, EngineDied) as exc:
            raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None

    async def enqueue_all(self, requests: list) -> list[Ticket]:
        """Queue every request, or none: on the first refusal the ones queued are cancelled."""
        tickets: list[Ticket] = []
        try:
            for r in requests:
                tickets.append(await self.enqueue(r))
        except BaseException:
            for t in tickets:
                self.client.cancel(t)
            raise
        return tickets

    async def generate(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """Run requests concurrently; the first failure cancels the others and maps to an HTTP error."""
        tickets = await self.enqueue_all(requests)
        tasks = [asyncio.ensure_future(self.outcome(r, t)) for r, t in zip(requests, tickets, strict=True)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def finished(self, ticket: Ticket) -> Done:
        """The request's result once done; a timeout is a 504, a dead engine a 503, else a 500. Traced:
        its engine stages become spans."""
        try:
            done = await self.client.wait(ticket)
            if self.tracing is not None:
                self.tracing.engine_spans(done)
            return done
        except SequenceFailed as exc:
            if self.tracing is not None:
                self.tracing.engine_spans(exc.done)
            if exc.reason == "timeout":
                raise ApiError(
                    504, f"request did not finish within {self.settings.request_timeout_s}s"
                ) from None
            if exc.reason == "engine_died":
                raise ApiError(
                    503, "the engine process died; the server restarts", {"Retry-After": "5"}
                ) from None
            raise ApiError(500, "the request failed in the engine") from None

    async def outcome(self, request: GenerationRequest, ticket: Ticket) -> Outcome:
        done = await self.finished(ticket)
        texts = ticket.text.texts() if ticket.text is not None else None  # made as the tokens came
        if self.tracing is None:
            return Outcome(self.engine.result(request, done.outputs, texts), done.queue_s)
        with self.tracing.span("detokenize"):
            result = self.engine.result(request, done.outputs, texts)
        self.tracing.record_usage(result.prompt_tokens, result.completion_tokens)
        return Outcome(result, done.queue_s)

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[RetrievalOutput]:
        """Queue matching / embedding requests (one engine step each, batched with the others)."""
        tickets = await self.enqueue_all(requests)
        try:
            return [(await self.finished(t)).retrieval for t in tickets]
        except BaseException:
            for t in tickets:
                self.client.cancel(t)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[Update] | Outcome]:
        """Queue a request (errors raise here), then iterate: the outputs' updates after each engine step
        (new text, tokens, log-probabilities), the last ones with their finish reasons, and last the
        Outcome. Closing the iterator early cancels the request and frees its slots."""
        ticket = await self.enqueue(request, stream=True)
        return self._events(request, ticket)

    async def _events(
        self, request: GenerationRequest, ticket: Ticket
    ) -> AsyncIterator[list[Update] | Outcome]:
        events = ticket.progress
        done = asyncio.ensure_future(self.outcome(request, ticket))
        span = self.tracing.start_span("stream") if self.tracing is not None else None
        try:
            while not done.done() or not events.empty():
                if events.empty():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    yield getter.result()
                else:
                    yield events.get_nowait()
            yield done.result()
        finally:
            if span is not None:
                if not done.done():  # the client went away: the request is cancelled
                    span.set_attribute("blipserve.finish_reason", "cancelled")
                span.end()
            if not done.done():
                done.cancel()
                self.client.cancel(ticket)


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


__all__ = ["Outcome", "Service", "elapsed_ms"]
