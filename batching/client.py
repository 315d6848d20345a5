"""The asyncio side of an engine: queue a request, await its `Done`, follow its progress, cancel it.

`EngineClient` holds what every client shares (tickets, the deadline backstop, failing everything when
the engine is gone) and is the front end of generation: the engine reports only new token ids, which
each ticket's `RequestText` gathers and turns into text (with `tokenizer` set), applying stop strings;
a request whose outputs all ended at one is aborted in the engine and answered here. `InprocClient`
drives an `EngineCore` thread in this process (tests, the offline server mode);
`batching.process_client.ProcessClient` talks to an engine process over ZMQ.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from model.data.detokenizer import RequestText, unreported
from model.data.tokenizer import TextTokenizer
from model.runtime.plan import ScoringOutput

from .engine_core import EngineCore
from .protocol import Done, Progress, reports_each_step
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
    """A queued request: the future of its `Done` and, when streaming, a queue of its progress (a list
    of `model.data.detokenizer.Update` per report, the last ones with the finish reasons)."""

    req_id: int
    done: asyncio.Future
    timeout_s: float | None
    progress: asyncio.Queue | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A generation request's outputs so far: tokens, text, stop strings (the front end's state).
    text: RequestText | None = None


class EngineClient:
    """Tickets by request id; subclasses deliver `Done` and progress with `_deliver_*`."""

    def __init__(self) -> None:
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count()
        # The checkpoint's tokenizer: outputs get their text (and stop strings) here; None: tokens only.
        self.tokenizer: TextTokenizer | None = None

    def use_tokenizer(self, tokenizer: TextTokenizer) -> None:
        """Make the text of generated tokens here (the server's front end)."""
        self.tokenizer = tokenizer

    @property
    def pending(self) -> int:
        """Requests queued and not yet answered."""
        return len(self._tickets)

    def _new_ticket(self, timeout_s: float | None, stream: bool, request: Any = None) -> Ticket:
        loop = asyncio.get_running_loop()
        ticket = Ticket(next(self._ids), loop.create_future(), timeout_s, asyncio.Queue() if stream else None)
        params = getattr(request, "params", None)
        if params is not None:  # generation (retrieval and scoring answer in their `Done`)
            ticket.text = RequestText(self.tokenizer, request.prompt_ids, params)
        self._tickets[ticket.req_id] = ticket
        return ticket

    def _deliver_progress(self, progress: Progress) -> None:
        """Gather a report's new tokens; stream their text; answer a request that ended at stop strings
        (and abort it in the engine)."""
        ticket = self._tickets.get(progress.req_id)
        if ticket is None or ticket.text is None:
            return
        updates = ticket.text.add(progress.outputs)
        if ticket.progress is not None and updates:
            ticket.progress.put_nowait(updates)
        if ticket.text.ended_here:
            self.cancel(ticket)
            self._deliver_done(Done(progress.req_id, "stop", progress.queue_s))

    def _deliver_done(self, done: Done) -> None:
        """Settle the ticket; a finished generation's `outputs` become the whole outputs gathered here."""
        ticket = self._tickets.pop(done.req_id, None)
        if ticket is None or ticket.done.done():
            return
        if ticket.text is not None and done.ok:
            updates = ticket.text.finish(done.outputs)
            done.outputs = ticket.text.token_outputs()
            if ticket.progress is not None:
                ticket.progress.put_nowait(updates)
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


def queue_seconds(seq: Sequence) -> float:
    """Seconds from its arrival to its admission (so far, while it waits)."""
    return (seq.admitted or seq.arrived) - seq.arrived


def progress_of(seq: Sequence, req_id: int) -> Progress | None:
    """The `Progress` message of what a sequence gained since its last report; None if nothing."""
    news = unreported(seq.outputs(), seq.reported)
    return None if news is None else Progress(req_id, news, queue_seconds(seq))


def done_of(seq: Sequence, req_id: int | None = None) -> Done:
    """The `Done` message of a sequence that left the scheduler (its outputs: what was not reported)."""
    reason = seq.finish_reason or "error"
    queue_s = queue_seconds(seq)
    ok = reason in ("stop", "length")
    outputs = (unreported(seq.outputs(), seq.reported) or []) if ok and seq.state is not None else []
    req = seq.seq_id if req_id is None else req_id
    answer = seq.output if ok else None
    stamps = seq.timestamps() if seq.trace else {}
    if isinstance(answer, ScoringOutput):
        return Done(req, reason, queue_s, outputs, scores=answer, timestamps=stamps)
    return Done(req, reason, queue_s, outputs, answer, timestamps=stamps)


class InprocClient(EngineClient):
    """An `EngineCore` on a thread of this process: the same client API as an engine process."""

    def __init__(self, loop: EngineCore, metrics: Any = None):
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
        ticket = self._new_ticket(timeout_s, stream, request)
        try:
            seq = self.loop.add(request, timeout_s, reports_each_step(request, stream), trace)
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
                progress = progress_of(seq, req_id)
                if progress is not None:
                    aloop.call_soon_threadsafe(self._deliver_progress, progress)

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_http(endpoint, status, seconds)

    async def metrics_text(self) -> bytes:
        return self.metrics.render() if self.metrics is not None else b""

    def start(self) -> None:
        self.loop.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        self.loop.shutdown(timeout_s)
