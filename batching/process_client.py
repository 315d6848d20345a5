"""An HTTP process's side of the engine process: one DEALER socket, one reader task, one watcher.

Requests go out as `Add` + pixel frame; `add` returns once the engine has accepted (or refused: queue
full -> QueueFull, shutting down -> EngineStopped, invalid -> ValueError). Results come back as
`StepOutputs` (each step's `Progress` / `Done`) on the same socket. If the engine process dies, every
open request fails at once (`engine_died`), `healthy` turns False and `on_engine_death` runs. With `rejoin` (one engine of --dp,
which the main process restarts), it then says Hello every half second until the engine answers again.
Acks and results carry the engine's `Load`, kept in `load` for the data-parallel router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from batching import EngineStopped, QueueFull
from batching.client import EngineClient, Ticket
from batching.protocol import (
    Abort,
    Accepted,
    Hello,
    HttpObservations,
    Info,
    Load,
    MetricsQuery,
    MetricsText,
    Rejected,
    StepOutputs,
    add_message,
    decode_from_engine,
    encode,
    reports_each_step,
)

from .engine_process import pid_alive

log = logging.getLogger(__name__)


class EngineDied(Exception):
    """The engine process is gone."""


REJOIN_HELLO_S = 0.5
# HTTP outcomes go to the engine in one message per this many seconds (and before a metrics query): a
# message per request cost the engine's loop ~1.5 % of its CPU under load, and this process ~3 %.
HTTP_FLUSH_S = 0.1
METRICS_TIMEOUT_S = 5.0  # a metrics query unanswered this long raises TimeoutError (/metrics: 503)


class ProcessClient(EngineClient):
    def __init__(
        self,
        address: str,
        alive: Callable[[], bool] | None = None,
        poll_s: float = 0.2,
        pid: int = 0,
        rejoin: bool = False,
    ):
        """`alive()`: is the engine process still running? None: is process `pid` (updated from each
        `Info`, so a restarted engine's new one) running. `rejoin`: wait for a restarted engine after a
        death instead of staying dead."""
        super().__init__()
        self.address = address
        self.pid = pid
        self.alive = alive or (lambda: pid_alive(self.pid))
        self.poll_s = poll_s
        self.rejoin = rejoin
        self.info: Info | None = None
        self.dead = False
        self.deaths = 0
        self.load: Load | None = None  # the engine's, as of its last ack or result
        self.unacked = 0  # requests sent and not yet acknowledged
        self.on_engine_death: Callable[[], None] = lambda: None
        self._acks: dict[int, asyncio.Future] = {}
        self._metrics: deque[asyncio.Future] = deque()
        self._http_seen: list[tuple[str, int, float]] = []  # gathered for the next `HttpObservations`
        self._http_timer: asyncio.TimerHandle | None = None  # when they go
        self._closed = False
        self._info: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    @property
    def healthy(self) -> bool:
        return not self.dead and self.info is not None

    async def connect(self) -> Info:
        """Connect and wait until the engine has loaded its model (or died trying)."""
        await self.open()
        self.info = await self._info
        return self.info

    async def open(self) -> None:
        """Connect and say Hello; the engine's `Info` settles `self._info` once it has loaded its model."""
        self._ctx = zmq.asyncio.Context()
        self._ctx.setsockopt(zmq.LINGER, 0)  # no socket of it waits for a peer that is gone at term
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # see batching/engine_io.py: nothing may be dropped
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(self.address)
        self._info = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        await self._sock.send(encode(Hello()))

    async def add(
        self, request: Any, timeout_s: float | None = None, stream: bool = False, trace: bool = False
    ) -> Ticket:
        if self.dead:
            raise EngineStopped("the engine process died; the server restarts")
        ticket = self._new_ticket(timeout_s, stream, request)
        ack = self._acks[ticket.req_id] = asyncio.get_running_loop().create_future()
        self.unacked += 1
        try:
            await self._sock.send_multipart(
                add_message(ticket.req_id, request, timeout_s, reports_each_step(request, stream), trace),
                copy=False,
            )
            reply = await ack
        except BaseException:
            self._tickets.pop(ticket.req_id, None)
            self._acks.pop(ticket.req_id, None)
            raise
        finally:
            self.unacked -= 1
        if isinstance(reply, Rejected):
            self._tickets.pop(ticket.req_id, None)
            errors = {"queue_full": QueueFull, "stopped": EngineStopped, "error": RuntimeError}
            error = errors.get(reply.reason, ValueError)  # "invalid": the request's fault (422)
            raise error(reply.message)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self._post(Abort([ticket.req_id]))

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        """Gathered: the engine counts it within `HTTP_FLUSH_S`, or at once if this process asks for
        metrics first (another HTTP process's /metrics may show it up to that much later)."""
        self._http_seen.append((endpoint, status, seconds))
        if self._http_timer is None:
            try:
                self._http_timer = asyncio.get_running_loop().call_later(HTTP_FLUSH_S, self._flush_http)
            except RuntimeError:  # no event loop here: at once
                self._flush_http()

    def _flush_http(self) -> None:
        if self._http_timer is not None:
            self._http_timer.cancel()
            self._http_timer = None
        seen, self._http_seen = self._http_seen, []
        if seen:
            self._post(HttpObservations(seen))

    async def metrics_text(self) -> bytes:
        """The engine's registry (HTTP counters of every HTTP process included; this process's
        gathered ones sent first, on the same socket, so the engine counts them before it answers)."""
        self._flush_http()
        future = asyncio.get_running_loop().create_future()
        self._metrics.append(future)
        await self._sock.send(encode(MetricsQuery()))
        return await asyncio.wait_for(future, METRICS_TIMEOUT_S)

    def _post(self, message: Any) -> None:
        """Send without waiting for anything; nothing once closed or while the engine is dead."""
        if self._sock is not None and not self.dead and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                sent = self._sock.send(encode(message), zmq.NOBLOCK)
                # An asyncio socket reports a failed send in its future: a gone engine, which the
                # watcher reports; retrieved here so that asyncio does not log it as never retrieved.
                sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _read(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                msg = decode_from_engine(data)
            except Exception:
                log.exception("undecodable message from the engine")
                continue
            if isinstance(msg, StepOutputs):
                for progress in msg.progress:
                    self._deliver_progress(progress)
                for done in msg.done:
                    self.load = done.load or self.load
                    self._deliver_done(done)
            elif isinstance(msg, Accepted | Rejected):
                self.load = msg.load or self.load
                ack = self._acks.pop(msg.req_id, None)
                if ack is not None and not ack.done():
                    ack.set_result(msg)
            elif isinstance(msg, Info):
                if self._info is not None and not self._info.done():
                    self._info.set_result(msg)
            elif isinstance(msg, MetricsText) and self._metrics:
                future = self._metrics.popleft()
                if not future.done():
                    future.set_result(msg.text)

    async def _watch(self) -> None:
        if self.rejoin:  # a Hello sent before the engine bound its socket may be lost: say it until answered
            await self._rejoin()
        while True:
            while self.alive():
                if self.info is None and self._info.done() and self._info.exception() is None:
                    self._joined(self._info.result())
                await asyncio.sleep(self.poll_s)
            self._died()
            if not self.rejoin:
                return
            await self._rejoin()

    def _joined(self, info: Info) -> None:
        self.info, self.pid, self.dead, self.load = info, info.pid, False, None

    async def _rejoin(self) -> None:
        """Say Hello until a live engine answers (the main process restarts a dead one)."""
        while True:
            self._info = asyncio.get_running_loop().create_future()
            with contextlib.suppress(zmq.ZMQError):
                await self._sock.send(encode(Hello()))
            with contextlib.suppress(TimeoutError):
                info = await asyncio.wait_for(asyncio.shield(self._info), REJOIN_HELLO_S)
                if pid_alive(info.pid):
                    self._joined(info)
                    back = "is back" if self.deaths else "joined"  # --dp says Hello this way at start too
                    log.info("engine on %s %s (pid %d)", info.device, back, info.pid)
                    return

    def _died(self) -> None:
        if self.dead:
            return
        self.dead = True
        self.deaths += 1
        log.error("the engine process died; failing %d open requests", self.pending)
        error = EngineDied("the engine process died")
        for future in [*self._acks.values(), *self._metrics, self._info]:
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: no "never retrieved" warning when no one awaits it
        self._acks.clear()
        self._metrics.clear()
        self.fail_all("engine_died")
        self.on_engine_death()

    async def close(self) -> None:
        self._flush_http()  # what this process answered last still counts (sent before the socket closes)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
