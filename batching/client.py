"""The asyncio side of an engine: queue a request, await its `Done`, follow its progress, cancel it.

`EngineClient` holds what every client shares (tickets, the deadline backstop, failing everything when
the engine is gone). `InprocClient` drives an `EngineLoop` thread in this process (tests, the offline
server mode); `batching.process_client.ProcessClient` talks to an engine process over ZMQ.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from model.runtime.plan import ScoringOutput

from .engine_loop import EngineLoop
from .protocol import Done, TokenOutput
from .scheduler import Sequence

BACKSTOP_S = 5.0


class SequenceFailed(Exception):
    """The request ended without a result: cancelled, timeout, error, or the engine died (engine_died)."""

    def __init__(self, done: Done):
        super().__init__(f"request ended: {done.finish_reason}")
        self.done = done
        self.reason = done.finish_reason


@dataclass
class Ticket:
    """A queued request: the future of its `Done` and, when streaming, a queue of its progress."""

    req_id: int
    done: asyncio.Future
    timeout_s: float | None
    progress: asyncio.Queue | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient:
    """Tickets by request id; subclasses deliver `Done` and progress with `_deliver_*`."""

    def __init__(self) -> None:
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count()

    @property
    def pending(self) -> int:
        """Requests queued and not yet answered."""
        return len(self._tickets)

    def _new_ticket(self, timeout_s: float | None, stream: bool) -> Ticket:
        loop = asyncio.get_running_loop()
        ticket = Ticket(next(self._ids), loop.create_future(), timeout_s, asyncio.Queue() if stream else None)
        self._tickets[ticket.req_id] = ticket
        return ticket

    def _deliver_progress(self, req_id: int, outputs: list[TokenOutput]) -> None:
        ticket = self._tickets.get(req_id)
        if ticket is not None and ticket.progress is not None:
            ticket.progress.put_nowait(outputs)

    def _deliver_done(self, done: Done) -> None:
        ticket = self._tickets.pop(done.req_id, None)
        if ticket is not None and not ticket.done.done():
            ticket.done.set_result(done)

    def fail_all(self, reason: str) -> None:
        """Settle every open ticket as failed (the engine is gone: nothing may hang)."""
        for req_id in list(self._tickets):
            self._deliver_done(Done(req_id, reason, 0.0))

    async def wait(self, ticket: Ticket) -> Done:
        """The request's `Done`; raises SequenceFailed unless it finished (stop / length). Cancelling the
        awaiting task (client gone) cancels the request: its slots are freed at the next step."""
        try:
            if ticket.timeout_s is None:
                done = await asyncio.shield(ticket.done)
            else:
                # The engine enforces the deadline; this is the backstop should the engine stall.
                done = await asyncio.wait_for(asyncio.shield(ticket.done), ticket.timeout_s + BACKSTOP_S)
        except TimeoutError:
            self.cancel(ticket)
            raise SequenceFailed(Done(ticket.req_id, "timeout", 0.0)) from None
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise
        if not done.ok:
            raise SequenceFailed(done)
        return done

    async def submit(self, request: Any, timeout_s: float | None = None) -> Done:
        """add + wait."""
        return await self.wait(await self.add(request, timeout_s))

    # The engine-specific part.
    async def add(
        self, request: Any, timeout_s: float | None = None, stream: bool = False, trace: bool = False
    ) -> Ticket:
        """Queue `request`; `stream`: deliver its progress; `trace`: its `Done` carries timestamps."""
        raise NotImplementedError

    def cancel(self, ticket: Ticket) -> None:
        raise NotImplementedError


def done_of(seq: Sequence, req_id: int | None = None) -> Done:
    """The `Done` message of a sequence that left the scheduler."""
    reason = seq.finish_reason or "error"
    queue_s = (seq.admitted or seq.arrived) - seq.arrived
    ok = reason in ("stop", "length")
    outputs = seq.outputs() if ok else []
    req = seq.seq_id if req_id is None else req_id
    answer = seq.output if ok else None
    stamps = seq.timestamps() if seq.trace else {}
    if isinstance(answer, ScoringOutput):
        return Done(req, reason, queue_s, outputs, scores=answer, timestamps=stamps)
    return Done(req, reason, queue_s, outputs, answer, timestamps=stamps)


class InprocClient(EngineClient):
    """An `EngineLoop` on a thread of this process: the same client API as an engine process."""

    def __init__(self, loop: EngineLoop, metrics: Any = None):
        super().__init__()
        self.loop = loop
        self.metrics = metrics  # `batching.metrics.Metrics` (observe_http, render), or None
        # seq_id -> (the event loop that awaits it, the client's request id)
        self._seqs: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}
        loop.on_finished = self._finished
        loop.on_progress = self._progress

    @property
    def healthy(self) -> bool:
        return self.loop.healthy

    async def add(
        self, request: Any, timeout_s: float | None = None, stream: bool = False, trace: bool = False
    ) -> Ticket:
        """Queue now; raises QueueFull, EngineStopped or ValueError."""
        ticket = self._new_ticket(timeout_s, stream)
        try:
            seq = self.loop.add(request, timeout_s, stream, trace)
        except Exception:
            self._tickets.pop(ticket.req_id)
            raise
        ticket.extra["seq"] = seq
        self._seqs[seq.seq_id] = (asyncio.get_running_loop(), ticket.req_id)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        seq = ticket.extra.get("seq")
        if seq is not None:
            self.loop.cancel(seq)

    def _finished(self, seqs: list[Sequence]) -> None:  # engine thread
        for seq in seqs:
            entry = self._seqs.pop(seq.seq_id, None)
            if entry is not None:
                aloop, req_id = entry
                aloop.call_soon_threadsafe(self._deliver_done, done_of(seq, req_id))

    def _progress(self, seqs: list[Sequence]) -> None:  # engine thread: copy now, deliver on the loop
        for seq in seqs:
            entry = self._seqs.get(seq.seq_id)
            if entry is not None:
                aloop, req_id = entry
                aloop.call_soon_threadsafe(self._deliver_progress, req_id, seq.outputs())

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_http(endpoint, status, seconds)

    async def metrics_text(self) -> bytes:
        return self.metrics.render() if self.metrics is not None else b""

    def start(self) -> None:
        self.loop.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        self.loop.shutdown(timeout_s)
