"""The engine process's I/O shell (`EngineIO`) around its `EngineCore`: one ROUTER socket that every HTTP process's DEALER connects to.

The shell decodes requests and queues them into the loop (acknowledging each at once, so a full queue is
a 429 before any response starts), cancels on `Abort`, answers `Hello` and metrics queries, and sends the
results the loop reports. Where that happens depends on the device:

- **CUDA** (`inline=False`): the process's main thread runs the `EngineCore` and nothing else; an I/O
  thread owns the socket, and takes requests while the main thread waits on the device. The results the
  loop encodes on its own thread reach the I/O thread through an inproc pipe (a zmq socket is used by one
  thread).
- **CPU** (`inline=True`): the loop's thread computes the model itself, so an I/O thread could only take
  the same core (and the GIL) from it, and wake the loop for every message. The main thread receives
  between steps instead, everything that arrived in one go, and sends results directly (SGLang's
  scheduler does the same: `recv_requests` at the top of its event loop). A request that arrives during a
  step is acknowledged when the step ends, which is when it could first be scheduled anyway.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import zmq

from .client import done_of, progress_of
from .engine_core import EngineCore, EngineStopped
from .protocol import (
    READ_ONLY_WARNING,
    Abort,
    Accepted,
    Add,
    Hello,
    HttpObservations,
    Info,
    Load,
    MetricsQuery,
    MetricsText,
    Rejected,
    Shutdown,
    StepOutputs,
    decode_to_engine,
    encode,
    pixels_of,
)
from .scheduler import QueueFull, Sequence

log = logging.getLogger(__name__)

# (Add, pixels or None) -> a request for the scheduler; raises ValueError for a request it cannot take.
RequestBuilder = Callable[[Add, Any], Any]
PIPE = "inproc://blipserve-results"


class EngineIO:
    def __init__(
        self,
        loop: EngineCore,
        build_request: RequestBuilder,
        info: Info,
        metrics_text: Callable[[], bytes],
        observe_http: Callable[[str, int, float], None],
        inline: bool = False,
    ):
        """`inline`: receive on the loop's thread between steps (CPU engines), not on an I/O thread."""
        self.loop = loop
        self.inline = inline
        self.build_request = build_request
        self.info = info
        self.metrics_text = metrics_text
        self.observe_http = observe_http
        self.ctx = zmq.Context()
        # Every socket of this context closes without waiting for peers that are gone (the router sets
        # its own): an infinite linger can make the context's term block for good, even when it runs at
        # garbage collection.
        self.ctx.setsockopt(zmq.LINGER, 0)
        warnings.filterwarnings("ignore", message=READ_ONLY_WARNING)
        # seq_id -> (HTTP process identity, its request id); (identity, request id) -> sequence.
        self._owners: dict[int, tuple[bytes, int]] = {}
        self._seqs: dict[tuple[bytes, int], Sequence] = {}
        self._lock = threading.Lock()
        self._pipe_out = threading.local()
        loop.on_finished = self._finished
        loop.on_progress = self._progress
        self._stop_io = threading.Event()
        self._router: zmq.Socket | None = None  # inline: results go straight out through it

    def serve(self, address: str) -> None:
        """Bind, answer HTTP processes, and step until a `Shutdown` has drained the accepted requests."""
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 2000)  # the last results still go out after a drain
        # No high-water mark: past one, a ROUTER drops messages silently, and a dropped result is a request
        # that never ends. The queue is bounded by the requests in flight anyway.
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.bind(address)
        log.info("engine ready on %s", address)
        if self.inline:
            self._router = router
            try:
                self._serve_inline(router)
            finally:
                self._router = None
                router.close()
            return
        pipe_in = self.ctx.socket(zmq.PULL)
        pipe_in.setsockopt(zmq.RCVHWM, 0)
        pipe_in.bind(PIPE)
        io = threading.Thread(target=self._io, args=(router, pipe_in), name="blipserve-io", daemon=True)
        io.start()
        try:
            self.loop.run()
        finally:
            self._stop_io.set()
            io.join(5)
            if (pipe := getattr(self._pipe_out, "sock", None)) is not None:  # this (the loop's) thread's
                pipe.close(0)
            router.close()
            pipe_in.close(0)

    def _serve_inline(self, router: zmq.Socket) -> None:
        """The loop's thread: take every message that arrived, then step when a step is due; block on
        the socket when there is nothing to run (`EngineCore.due_in`; 100 ms at most, to see a stop
        asked from another thread)."""
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        loop = self.loop
        while not loop.drained:
            due = loop.due_in()
            # Whole milliseconds, rounded up: pyzmq truncates, and a wait under 1 ms would spin.
            if poller.poll(100 if due is None else math.ceil(1000 * due)):
                self._receive(router)
                due = loop.due_in()
            if due == 0:
                loop.step()

    # The I/O thread (CUDA).
    def _io(self, router: zmq.Socket, pipe_in: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pipe_in, zmq.POLLIN)
        while not self._stop_io.is_set():
            events = dict(poller.poll(100))
            if pipe_in in events:
                for _ in range(1000):  # results first: they free clients; then take new work
                    try:
                        router.send_multipart(pipe_in.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
                    except zmq.Again:
                        break
            if router in events:
                self._receive(router)
        # Whatever the loop reported last still goes out.
        while True:
            try:
                router.send_multipart(pipe_in.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break

    def _receive(self, router: zmq.Socket) -> None:
        """Handle the messages waiting on the socket (up to 1,000), answering those that ask."""
        for _ in range(1000):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                reply = self._handle(frames[0].bytes, frames[1:])
            except Exception:  # a bug in handling one message must not end the engine (inline: the loop)
                log.exception("error handling a message from %r", frames[0].bytes)
                continue
            if reply is not None:
                router.send_multipart([frames[0].bytes, encode(reply)])

    def _handle(self, who: bytes, frames: list) -> Any:
        try:
            msg = decode_to_engine(frames[0].buffer)
        except Exception:
            log.exception("undecodable message from %r", who)
            return None
        if isinstance(msg, Add):
            return self._add(who, msg, frames[1].buffer if len(frames) > 1 else None)
        if isinstance(msg, Abort):
            with self._lock:
                seqs = [self._seqs.get((who, r)) for r in msg.req_ids]
            for seq in seqs:
                if seq is not None:
                    self.loop.cancel(seq)
            return None
        if isinstance(msg, Hello):
            return self.info
        if isinstance(msg, MetricsQuery):
            return MetricsText(self.metrics_text())
        if isinstance(msg, HttpObservations):
            for endpoint, status, seconds in msg.seen:
                self.observe_http(endpoint, status, seconds)
            return None
        if isinstance(msg, Shutdown):
            log.info("shutdown asked: finishing %d accepted requests", self.loop.pending)
            self.loop.stop_accepting(drain=True)
        return None

    def _add(self, who: bytes, msg: Add, frame: Any) -> Accepted | Rejected:
        try:
            request = self.build_request(msg, pixels_of(msg, frame))
            with self._lock:  # held over add: the loop may finish the sequence before we record it
                seq = self.loop.add(request, msg.timeout_s, msg.stream, msg.trace)
                self._owners[seq.seq_id] = (who, msg.req_id)
                self._seqs[(who, msg.req_id)] = seq
        except QueueFull as exc:
            return Rejected(msg.req_id, "queue_full", str(exc), self.load())
        except EngineStopped as exc:
            return Rejected(msg.req_id, "stopped", str(exc), self.load())
        except ValueError as exc:
            return Rejected(msg.req_id, "invalid", str(exc), self.load())
        except Exception as exc:  # our bug, not the request's: the request fails (500), the engine goes on
            log.exception("error taking request %d", msg.req_id)
            return Rejected(msg.req_id, "error", f"{type(exc).__name__}: {exc}", self.load())
        return Accepted(msg.req_id, self.load())

    def load(self) -> Load:
        """The scheduler's counts now (read from any thread: lengths of lists the loop thread changes,
        a moment's staleness is all a router needs)."""
        s = self.loop.scheduler
        return Load(len(s.waiting), len(s.running), len(s.free_slots), s.max_queue)

    # The loop's thread.
    def _pipe(self) -> zmq.Socket:
        sock = getattr(self._pipe_out, "sock", None)
        if sock is None:
            sock = self._pipe_out.sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # a PUSH past its mark would block the engine loop
            sock.connect(PIPE)
        return sock

    def _finished(self, seqs: list[Sequence]) -> None:
        """The step's finished requests: one `StepOutputs` per HTTP process (the engine thread)."""
        batches: dict[bytes, StepOutputs] = {}
        load = self.load()
        with self._lock:
            owners = [self._owners.pop(seq.seq_id, None) for seq in seqs]
            for owner in owners:
                if owner is not None:
                    self._seqs.pop(owner, None)
        for seq, owner in zip(seqs, owners, strict=True):
            if owner is not None:
                done = done_of(seq, owner[1])
                done.load = load
                batches.setdefault(owner[0], StepOutputs()).done.append(done)
        self._send(batches)

    def _progress(self, seqs: list[Sequence]) -> None:
        """The step's new tokens of reporting requests: one `StepOutputs` per HTTP process."""
        batches: dict[bytes, StepOutputs] = {}
        with self._lock:
            owners = [self._owners.get(seq.seq_id) for seq in seqs]
        for seq, owner in zip(seqs, owners, strict=True):
            progress = progress_of(seq, owner[1]) if owner is not None else None
            if progress is not None:
                batches.setdefault(owner[0], StepOutputs()).progress.append(progress)
        self._send(batches)

    def _send(self, batches: dict[bytes, StepOutputs]) -> None:
        """Each HTTP process's message of this step: straight out (inline), or to the I/O thread through
        the pipe."""
        sock = self._router if self._router is not None else self._pipe()
        for who, message in batches.items():
            sock.send_multipart([who, encode(message)])
