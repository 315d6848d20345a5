"""The engine loop: one thread that owns the model and repeats schedule -> run -> postprocess.

The asyncio side only submits requests and awaits futures, so no model work ever runs on the event
loop. A step that raises fails only the sequences in that step; the loop carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from model.plan import StepOutput, StepPlan

from .scheduler import QueueFull, Scheduler, Sequence

log = logging.getLogger(__name__)


class Runner(Protocol):
    def run(self, plan: StepPlan) -> StepOutput: ...


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class SequenceFailed(Exception):
    def __init__(self, seq: Sequence):
        super().__init__(f"request ended: {seq.finish_reason}")
        self.seq = seq


@dataclass
class Ticket:
    """A queued request: its sequence and the future that settles when it ends."""

    seq: Sequence
    future: asyncio.Future
    timeout_s: float | None


BACKSTOP_S = 5.0
UNHEALTHY_AFTER = 3
StepHook = Callable[[StepPlan, StepOutput, Scheduler], None]


class EngineLoop:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        max_wait_ms: float = 5.0,
        on_step: StepHook | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.max_wait_s = max_wait_ms / 1000
        self.on_step = on_step
        self._cond = threading.Condition()
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="blipserve-engine", daemon=True)
        self.steps = 0
        self.failures = 0  # consecutive failed steps

    @property
    def healthy(self) -> bool:
        """False once the engine thread is gone or several steps in a row have failed (/ready says 503)."""
        started = self._thread.ident is not None
        return (not started or self._thread.is_alive() or self._stop) and self.failures < UNHEALTHY_AFTER

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._futures)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def enqueue(
        self,
        request: Any,
        timeout_s: float | None = None,
        on_progress: Callable[[Sequence], None] | None = None,
    ) -> Ticket:
        """Queue a request from the event loop; raises QueueFull, EngineStopped or ValueError at once.

        `on_progress(seq)` runs on the engine thread after every step of the sequence (streaming): it
        must only copy what it needs and hand it to its own event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        deadline = time.monotonic() + timeout_s if timeout_s else None
        with self._cond:
            if not self._accepting:
                raise EngineStopped("server is shutting down")
            seq = self.scheduler.add(request, deadline)
            seq.on_progress = on_progress
            self._futures[seq.seq_id] = (loop, future)
            self._cond.notify()
        return Ticket(seq, future, timeout_s)

    async def wait(self, ticket: Ticket) -> Sequence:
        """The finished sequence; raises SequenceFailed. Cancelling the awaiting task (client gone)
        cancels the sequence: its slots are freed at the next step."""
        seq = ticket.seq
        try:
            if ticket.timeout_s is None:
                return await ticket.future
            # The scheduler enforces the deadline; this is the backstop should the engine thread stall.
            return await asyncio.wait_for(ticket.future, ticket.timeout_s + BACKSTOP_S)
        except TimeoutError:
            seq.cancelled, seq.finish_reason = True, "timeout"
            raise SequenceFailed(seq) from None
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise

    def cancel(self, ticket: Ticket) -> None:
        ticket.seq.cancelled = True
        with self._cond:
            self._cond.notify()

    async def submit(self, request: Any, timeout_s: float | None = None) -> Sequence:
        """enqueue + wait."""
        return await self.wait(self.enqueue(request, timeout_s))

    def _resolve(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            entry = self._futures.pop(seq.seq_id, None)
            if entry is None:
                continue
            loop, future = entry
            ok = seq.finish_reason in ("stop", "length")
            value = seq if ok else SequenceFailed(seq)
            loop.call_soon_threadsafe(_settle, future, value, ok)

    def _wait_for_work(self) -> bool:
        """Block until there is something to run; gather a vision batch while the engine is idle."""
        with self._cond:
            while not self.scheduler.has_work and not self._stop:
                self._cond.wait()
            if self._stop and not self.scheduler.has_work:
                return False
            if not self.scheduler.running and self.max_wait_s > 0:
                # Idle engine: give newcomers up to max_wait to form a fuller vision batch.
                oldest = self.scheduler.waiting[0].arrived if self.scheduler.waiting else time.monotonic()
                while (
                    len(self.scheduler.waiting) < self.scheduler.max_batch_images
                    and (left := oldest + self.max_wait_s - time.monotonic()) > 0
                    and not self._stop
                ):
                    self._cond.wait(timeout=left)
            return True

    def _loop(self) -> None:
        while self._wait_for_work():
            try:
                self._step()
            except Exception:
                # Nothing may kill this thread: every request would hang. Fail what is running, go on.
                log.exception("engine loop error; failing the running sequences")
                with self._cond:
                    failed = self.scheduler.fail_all()
                self._resolve(failed)

    def _step(self) -> None:
        with self._cond:
            plan, dropped = self.scheduler.schedule()
        self._resolve(dropped)
        if plan.is_empty():
            return
        try:
            out = self.runner.run(plan)
        except Exception:
            log.exception("engine step failed; failing its %d sequences", len(plan.prefills + plan.decodes))
            self.failures += 1
            with self._cond:
                failed = self.scheduler.fail(plan)
            self._resolve(failed)
            return
        self.failures = 0
        streaming = [s for s in self.scheduler.running if s.on_progress is not None]
        with self._cond:
            finished = self.scheduler.postprocess(plan, out)
        self.steps += 1
        # Progress first: its events reach the event loop before the future that ends the stream.
        self._progress(streaming)
        self._resolve(finished)
        if self.on_step is not None:
            self.on_step(plan, out, self.scheduler)

    @staticmethod
    def _progress(seqs: list[Sequence]) -> None:
        for seq in seqs:
            try:
                seq.on_progress(seq)
            except Exception:
                log.exception("progress callback failed for sequence %d", seq.seq_id)
                seq.on_progress = None

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop taking requests, finish every accepted one, then stop the thread."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def _settle(future: asyncio.Future, value: Any, ok: bool) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


__all__ = ["EngineLoop", "EngineStopped", "QueueFull", "SequenceFailed", "Ticket"]
