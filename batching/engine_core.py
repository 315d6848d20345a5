"""The engine core: the busy loop that owns the scheduler and the model runner and repeats `step()`:
schedule -> run -> postprocess (vLLM v1's `EngineCore`, nano-vllm's `LLMEngine.step`). It runs on one
thread: the engine process's main thread (its I/O shell is `batching.engine_io.EngineIO`), or a thread of
the HTTP process with `--engine thread`.

The offline API (`model.engine.Blip2Engine.generate`) drives the same loop in-process: it adds its
requests and calls `step()` until they finish, with no thread (nano-vllm's `LLM.generate`).

It is driven from outside through `add` and `cancel` (thread-safe) and reports through two hooks that
run on the engine thread: `on_finished(seqs)` for sequences that ended (done, dropped or failed) and
`on_progress(seqs)` for streaming sequences that gained tokens. The in-process client
(`batching.client.InprocClient`) turns them into asyncio futures; the engine process's I/O shell (`batching.engine_io`) into messages
to the HTTP processes. A step that raises fails only the sequences in that step; the loop carries on.

With `overlap`, the loop plans and launches step n+1 before it reads step n's tokens back, when step n
allows it (`StepPlan.chainable`: one token per sequence, chosen on the device, which step n+1 reads
from there): the host's work for step n (reading tokens, appending them, stop checks, results, streaming)
then runs while the device computes step n+1 (SGLang's overlap scheduler, vLLM's async scheduling).
The price: a sequence that ended at step n was also in step n+1 (that token is dropped), and the
slots it frees are handed out one step later. On a CPU "launching" is computing, so nothing is
gained there; on CUDA the decode step is one graph launch and the host's work hides behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from model.runtime.plan import StepOutput, StepPlan

from .scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)


class Runner(Protocol):
    def launch(self, plan: StepPlan) -> Any: ...

    def collect(self, launched: Any) -> StepOutput: ...


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


UNHEALTHY_AFTER = 3
StepHook = Callable[[StepPlan, StepOutput, Scheduler], None]
SeqHook = Callable[[list[Sequence]], None]


def _ignore(seqs: list[Sequence]) -> None:
    pass


class EngineCore:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        max_wait_ms: float = 5.0,
        on_step: StepHook | None = None,
        overlap: bool = False,
        on_finished: SeqHook = _ignore,
        on_progress: SeqHook = _ignore,
        raise_errors: bool = False,
    ):
        """`raise_errors`: a step that raises fails its sequences and re-raises (the offline API's
        caller sees the error); otherwise the loop logs it and carries on (serving)."""
        self.runner = runner
        self.scheduler = scheduler
        self.max_wait_s = max_wait_ms / 1000
        self.on_step = on_step
        self.on_finished = on_finished
        self.on_progress = on_progress
        self.overlap = overlap
        self.raise_errors = raise_errors
        # (plan, launched, when launched) of a step whose tokens are not read back yet: only with overlap.
        self._inflight: tuple[StepPlan, Any, float] | None = None
        self.launched_ahead = 0  # steps launched while the last one's tokens were still unread
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self.run, name="blipserve-engine", daemon=True)
        self.steps = 0
        self.failures = 0  # consecutive failed steps

    @property
    def healthy(self) -> bool:
        """False once the engine thread is gone or several steps in a row have failed (/ready says 503)."""
        started = self._thread.ident is not None
        return (not started or self._thread.is_alive() or self._stop) and self.failures < UNHEALTHY_AFTER

    @property
    def pending(self) -> int:
        """Requests accepted and not yet finished."""
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    def start(self) -> None:
        """Run the loop on its own thread (in-process serving); the engine process calls `run` itself."""
        self._thread.start()

    def add(
        self, request: Any, timeout_s: float | None = None, stream: bool = False, trace: bool = False
    ) -> Sequence:
        """Queue a request from any thread; raises QueueFull, EngineStopped or ValueError at once.
        With `stream`, `on_progress` reports the sequence after every step that gave it tokens; with
        `trace`, its result carries its stage timestamps (`Sequence.timestamps`)."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        with self._cond:
            if not self._accepting:
                raise EngineStopped("server is shutting down")
            seq = self.scheduler.add(request, deadline)
            seq.stream, seq.trace = stream, trace
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop the sequence at the next step (its slots go back to the pool); any thread."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def _wait_for_work(self) -> bool:
        """Block until a step is due (`due_in`); False once stopped and drained."""
        with self._cond:
            while (due := self.due_in()) != 0:
                if due is None and self._stop:
                    return False
                self._cond.wait(timeout=due)
            return True

    def due_in(self) -> float | None:
        """Seconds until the next step should run: 0 now, None when there is nothing to run. An idle
        engine gives newcomers up to `max_wait_ms` to form a fuller vision batch (from the oldest
        one's arrival), not past a full batch, a running sequence, a stop or half of a waiting request's
        timeout. The engine thread's wait and the engine process's inline receive
        (`batching.engine_io`) both follow it."""
        s = self.scheduler
        if not s.has_work:
            return None
        if s.running or len(s.waiting) >= s.max_batch_images or self._stop:
            return 0.0
        # From the oldest, not the first (a higher-priority newcomer goes ahead of it and must not restart
        # the wait); and never past half of a waiting request's time budget (its timeout), which is for
        # running it. Fewer than max_batch_images are waiting: a short scan.
        until = min(seq.arrived + self.max_wait_s for seq in s.waiting)
        for seq in s.waiting:
            if seq.deadline is not None:
                until = min(until, (seq.arrived + seq.deadline) / 2)
        return max(0.0, until - time.monotonic())

    @property
    def drained(self) -> bool:
        """Stopped (`stop_accepting(drain=True)`) and every accepted request finished."""
        return self._stop and not self.scheduler.has_work

    @property
    def has_work(self) -> bool:
        """Requests accepted and not finished, or a launched step not read back yet."""
        return self.scheduler.has_work or self._inflight is not None

    def run(self) -> None:
        """Step until `shutdown` and every accepted request has finished."""
        while self._wait_for_work():
            self.step()

    def step(self) -> None:
        """One engine step, synchronously: plan, launch, read the last launched step back (with
        overlap the one before this, read while this one runs), report through the hooks."""
        try:
            self._step()
        except Exception:
            self._inflight = None
            if self.raise_errors:
                with self._cond:
                    self._finish(self.scheduler.fail_all())
                raise
            # Nothing may kill this loop: every request would hang. Fail what is running, go on.
            log.exception("engine loop error; failing the running sequences")
            with self._cond:
                failed = self.scheduler.fail_all()
            self._finish(failed)

    def _step(self) -> None:
        with self._cond:
            plan, dropped = self.scheduler.schedule()
        self._finish(dropped)
        if self._inflight is not None and not plan.runs_model:
            self._complete(*self._inflight)  # this step may wait for vision: read the last one first
            self._inflight = None
        launched = None
        started = time.monotonic()
        if not plan.is_empty():
            self.launched_ahead += self._inflight is not None
            try:
                launched = self.runner.launch(plan)
            except Exception:
                self._failed(plan)
        if self._inflight is not None:  # the last step's tokens, read while this one runs
            self._complete(*self._inflight)
            self._inflight = None
        if launched is None:
            return
        if self.overlap and plan.chainable and plan.runs_model and self.scheduler.has_work:
            self._inflight = (plan, launched, started)
        else:
            # Without overlap, or when the step just read ended every request (nothing will be
            # launched behind this one, which only runs tokens to drop): read it now, not when the
            # next request comes.
            self._complete(plan, launched, started)

    def _complete(self, plan: StepPlan, launched: Any, started: float) -> None:
        """Read a launched step's tokens back and hand its results to the hooks (`started`: when it
        was launched, time.monotonic(), for the requests' stage times)."""
        try:
            out = self.runner.collect(launched)
        except Exception:
            self._failed(plan)
            return
        # A failed background vision batch counts as a failed step (its requests fail, not the others).
        self.failures = self.failures + 1 if out.vision_errors else 0
        streaming = [s for s in self.scheduler.running if s.stream]
        if streaming:
            stepped = {w.seq_id for w in plan.prefills + plan.decodes}
            streaming = [s for s in streaming if s.seq_id in stepped]
        with self._cond:
            finished = self.scheduler.postprocess(plan, out, started=started)
        self.steps += 1
        # The step's metrics before anything of it is reported: a client that has its result and then
        # reads /metrics finds its tokens counted (the other order raced the client's read).
        if self.on_step is not None:
            self.on_step(plan, out, self.scheduler)
        # Progress next: its events reach the client before the result that ends the stream.
        if streaming:
            self.on_progress(streaming)
        self._finish(finished)

    def _failed(self, plan: StepPlan) -> None:
        """A step raised (called inside the except, so the log has the traceback): its sequences
        fail, the others carry on."""
        if not self.raise_errors:
            log.exception("engine step failed; failing its %d sequences", len(plan.prefills + plan.decodes))
        self.failures += 1
        with self._cond:
            failed = self.scheduler.fail(plan)
        self._finish(failed)
        if self.raise_errors:
            raise

    def _finish(self, seqs: list[Sequence]) -> None:
        if seqs:
            self.on_finished(seqs)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop taking requests, finish every accepted one, then stop the thread."""
        self.stop_accepting(drain=True)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def stop_accepting(self, drain: bool = True) -> None:
        """New requests get EngineStopped; with `drain`, `run` returns once the accepted ones finish."""
        with self._cond:
            self._accepting = False
            self._stop = drain
            self._cond.notify_all()


__all__ = ["EngineCore", "EngineStopped"]
