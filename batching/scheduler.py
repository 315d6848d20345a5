"""Continuous-batching scheduler: which sequences run in the next engine step.

Pure bookkeeping over a fixed pool of KV-cache slots. A request waits in a bounded queue until enough
slots are free (one per beam); the queue is ordered by priority (higher first; FIFO within a priority:
online traffic at the default 0 is admitted before a batch job's requests at -10, which fill what is
left; a running request is never preempted); it then runs its prefill (and, if its image's embeddings are not
cached, the vision stage, batched with the other newcomers) and joins the running decode batch at the
next step. It leaves the moment it finishes, is cancelled or passes its deadline, and its slots go
straight back to the pool. The batch is never held back for its longest member.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from model.decoding.beam import advance_beams
from model.decoding.generation import FinishReason, TokenOutput
from model.decoding.state import DecodeState, new_state
from model.runtime.plan import (
    CacheMoves,
    RetrievalOutput,
    RetrievalRequest,
    RetrievalWork,
    ScoringOutput,
    ScoringRequest,
    ScoringWork,
    SequenceOutput,
    StepOutput,
    StepPlan,
)


class Stage(StrEnum):
    """Where an admitted generation request is (unset, "", while it waits in the queue)."""

    VISION = "vision"  # waiting for its image's background vision batch
    PREFILL = "prefill"  # to prefill in the next step
    DECODE = "decode"  # prefilled: one token per step


class QueueFull(Exception):
    """The waiting queue is at capacity; the client should retry later."""


@dataclass
class Sequence:
    """One request as the scheduler sees it."""

    seq_id: int
    # GenerationRequest (pixel_values, image_key, text_ids, prompt_ids, params), RetrievalRequest or
    # ScoringRequest
    request: Any
    # Its tokens so far and when it is done, owned here; None: a retrieval or scoring request (no
    # decoding, no slots, one step).
    state: DecodeState | None
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    slots: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread; honoured at the next schedule()
    finish_reason: FinishReason | None = None  # stop | length | cancelled | timeout | error
    stage: Stage | str = ""  # "" while waiting in the queue
    stream: bool = False  # streaming: the engine reports the outputs so far after each of its steps
    last_token_at: float | None = None  # when its last token came (the gap to the next is a metric)
    output: RetrievalOutput | ScoringOutput | None = None  # a retrieval or scoring request's answer
    priority: int = 0  # admission order: higher first, FIFO within one
    # Tracing: report the stage times below with the result. They are recorded either way (once per
    # request each, time.monotonic()): its vision stage and its own work in its first model step (the
    # prefill, or the retrieval heads), as (start, end), and when it left.
    trace: bool = False
    vision_span: tuple[float, float] | None = None
    work_span: tuple[float, float] | None = None
    finished_at: float | None = None
    # Per output: tokens reported to the front end so far, -1 once its end was too (`unreported`).
    reported: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.state.num_rows if self.state is not None else 0

    def outputs(self) -> list[TokenOutput]:
        """Its output sequences so far (n of them; beams: once the search ends): tokens, logprobs and
        finish reason. The one way other layers read a sequence's tokens."""
        return self.state.outputs() if self.state is not None else []

    def retrieval(self) -> RetrievalWork:
        r = self.request
        return RetrievalWork(self.seq_id, r.task, r.image_key, r.texts)

    def scoring(self) -> ScoringWork:
        r = self.request
        return ScoringWork(
            self.seq_id, r.image_key, r.text_ids, r.candidates, r.prefix_positions, r.source_positions
        )

    def timestamps(self) -> dict[str, float]:
        """Its stage boundaries in seconds since the Unix epoch (for `Done.timestamps`): "arrived",
        "admitted" (the queue wait between), "vision_start"/"vision_end", "prefill_start"/"prefill_end"
        (generation; the decode steps follow until "finished") or "retrieval_start", and "finished".
        Stages it did not reach are left out."""
        offset = time.time() - time.monotonic()
        stamps = {"arrived": self.arrived + offset}
        if self.admitted is not None:
            stamps["admitted"] = self.admitted + offset
        if self.vision_span is not None:
            stamps["vision_start"], stamps["vision_end"] = (t + offset for t in self.vision_span)
        if self.work_span is not None and self.state is not None:
            stamps["prefill_start"], stamps["prefill_end"] = (t + offset for t in self.work_span)
        elif self.work_span is not None:
            stamps["retrieval_start"] = self.work_span[0] + offset
        stamps["finished"] = (self.finished_at or time.monotonic()) + offset
        return stamps

    def first_step(self, started: float, out: StepOutput, now: float) -> None:
        """Record its first model step, launched at `started` (monotonic seconds): the step ran the
        vision stage inside it (when it did), the prefills, the decode step, then the retrieval heads
        (`ModelRunner.launch`); the runner's stage seconds place each in time."""
        vision_end = started + (out.vision_s if out.vision_in_step else 0.0)
        if self.vision_span is None and vision_end > started and self.request.image_key:
            self.vision_span = (started, vision_end)
        if self.state is not None:
            self.work_span = (vision_end, vision_end + out.prefill_s)
        else:
            self.work_span = (vision_end + out.prefill_s + out.decode_s, now)


READY_IMAGES = 4096  # image keys remembered as encoded (the runner re-encodes any it has evicted)


class Scheduler:
    """`background_vision`: newcomers' images are encoded in the background while running sequences
    decode; one batch at a time, so the next batch gathers every request that arrives meanwhile (its
    size follows the load, up to `max_batch_images`). Off: the vision stage runs inside the step."""

    def __init__(
        self,
        num_slots: int,
        max_queue: int,
        max_batch_images: int,
        eos_ids: tuple[int, ...],
        background_vision: bool = True,
    ):
        if num_slots < 1 or max_queue < 1 or max_batch_images < 1:
            raise ValueError("num_slots, max_queue and max_batch_images must be >= 1")
        self.num_slots = num_slots
        self.max_queue = max_queue
        self.max_batch_images = max_batch_images
        self.eos_ids = eos_ids
        self.background_vision = background_vision
        # Image key -> admitted sequences waiting for its background vision batch (in flight while any).
        self.encoding: dict[str, list[Sequence]] = {}
        self.ready_images: OrderedDict[str, None] = OrderedDict()
        # A min-heap: sequences take the lowest free slots, so the slots decoding stay packed at the
        # bottom of the cache and the fixed-shape decode step (slots [0, rows)) stays small.
        self.free_slots: list[int] = list(range(num_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.live: dict[int, Sequence] = {}  # the running sequences by seq_id
        self._ids = itertools.count()
        # Seconds between each decoding sequence's previous token and the one of the last step.
        self.token_gaps: list[float] = []
        # Seconds from arrival to the first token of each sequence that had its first in the last step.
        self.first_token_waits: list[float] = []
        # Seconds each request admitted since the last `take_queue_waits` waited in the queue.
        self.queue_waits: list[float] = []
        # Sequences that gained tokens in the last step (the tokens of a step run ahead of a sequence's
        # end are dropped, not counted).
        self.stepped = 0

    def add(self, request: Any, deadline: float | None = None) -> Sequence:
        """Queue a request; QueueFull if the queue is at capacity, ValueError if it can never fit."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")
        priority = getattr(request, "priority", 0)
        if isinstance(request, (RetrievalRequest, ScoringRequest)):
            seq = Sequence(next(self._ids), request, None, deadline, priority=priority)
            self._enqueue(seq)
            return seq
        state = new_state(request.params, request.prompt_ids, self.eos_ids)
        if state.num_rows > self.num_slots:
            raise ValueError(
                f"{state.num_rows} rows (num_beams or n) exceed the server's {self.num_slots} sequence slots"
            )
        seq = Sequence(next(self._ids), request, state, deadline, priority=priority)
        self._enqueue(seq)
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        """Behind every waiting request of its priority or higher, ahead of the lower ones. Searched from
        the back: with one priority in the queue (the usual case), that is an append."""
        at = len(self.waiting)
        while at > 0 and self.waiting[at - 1].priority < seq.priority:
            at -= 1
        self.waiting.insert(at, seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float | None = None) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan, and the sequences dropped since the last step (cancelled, timed out)."""
        now = time.monotonic() if now is None else now
        dropped = self._drop_dead(now)
        admitted, encode = self._admit(now)
        self.queue_waits += [now - s.arrived for s in admitted]
        one_step = [s for s in admitted if s.state is None]  # retrievals and scorings
        for seq in admitted:
            key = seq.request.image_key
            if seq.state is None:
                continue
            if self.background_vision and key and key not in self.ready_images:
                seq.stage = Stage.VISION
                self.encoding.setdefault(key, []).append(seq)
            else:
                seq.stage = Stage.PREFILL
        # A sequence whose launched tokens already reach its max_new_tokens (the last step's tokens not
        # read back yet, see EngineCore's overlap) has no next step (no work).
        decodes, moves, decode = [], CacheMoves(), Stage.DECODE
        for s in self.running:
            if s.stage is decode and (work := s.state.decode_work(s.seq_id, s.slots)) is not None:
                decodes.append(work)
                if work.beam_scores is not None:
                    s.state.reorder_moves(s.slots, moves)
        self.running.extend(admitted)
        self.live.update((s.seq_id, s) for s in admitted)
        prefills = [s for s in self.running if s.stage == Stage.PREFILL]
        needing = [*prefills, *one_step]
        images = {s.request.image_key: s.request.pixel_values for s in needing if s.request.image_key}
        for key in encode:
            images[key] = self.encoding[key][0].request.pixel_values
        plan = StepPlan(
            images=images,
            encode=encode,
            prefills=[
                s.state.prefill_work(s.seq_id, s.slots, s.request.image_key, s.request.text_ids)
                for s in prefills
            ],
            decodes=decodes,
            retrievals=[s.retrieval() for s in one_step if isinstance(s.request, RetrievalRequest)],
            scorings=[s.scoring() for s in one_step if isinstance(s.request, ScoringRequest)],
            awaits_vision=bool(self.encoding),
            moves=moves if moves.src else None,
        )
        for seq in prefills:
            seq.stage = Stage.DECODE
        return plan, dropped

    def take_queue_waits(self) -> list[float]:
        """The queue waits gathered since the last call (several schedules may run between two reads:
        with overlap, step n's results are read after step n + 1 is planned)."""
        waits, self.queue_waits = self.queue_waits, []
        return waits

    def _admit(self, now: float) -> tuple[list[Sequence], list[str]]:
        """Waiting requests that get their slots now (in queue order), and the new images to encode."""
        admitted: list[Sequence] = []
        images: list[str] = []  # new images of this step: one vision batch
        in_flight = bool(self.encoding)
        while self.waiting and len(self.free_slots) >= self.waiting[0].rows:
            seq = self.waiting[0]
            key = seq.request.image_key
            known = key in self.ready_images or key in self.encoding or key in images
            background = self.background_vision and seq.state is not None
            if key and not known:
                # Cap the new images of one vision batch (repeat images ride along for free); in the
                # background, wait while a batch is in flight: the next one gathers the newcomers.
                if len(images) >= self.max_batch_images or (background and in_flight):
                    break
                images.append(key)
            self.waiting.popleft()
            seq.slots = [heapq.heappop(self.free_slots) for _ in range(seq.rows)]
            seq.admitted = now
            admitted.append(seq)
        if not self.background_vision:
            return admitted, []
        # Retrievals and scorings encode their images inside the step; a new image goes to the background
        # batch when a generation request needs it.
        generating = {s.request.image_key for s in admitted if s.state is not None}
        return admitted, [k for k in images if k in generating]

    def _drop_dead(self, now: float) -> list[Sequence]:
        def dead(s: Sequence) -> bool:
            if s.cancelled:
                s.finish_reason = FinishReason.CANCELLED
            elif s.deadline is not None and now > s.deadline:
                s.finish_reason = FinishReason.TIMEOUT
            return s.finish_reason is not None

        dropped = [s for s in self.waiting if dead(s)] + [s for s in self.running if dead(s)]
        for seq in dropped:
            # Its state ends too: a step launched ahead of this one (EngineCore's overlap) ran a token
            # for the sequence, which it drops (it has left `running`), as for one that stopped.
            if seq.state is not None:
                seq.state.abort(seq.finish_reason)
        if dropped:
            for seq in dropped:
                seq.finished_at = now
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)
            self._release([s for s in dropped if s.slots])
        return dropped

    def postprocess(
        self, plan: StepPlan, out: StepOutput, now: float | None = None, started: float | None = None
    ) -> list[Sequence]:
        """Apply a step's results; return the sequences that finished (their slots are free again).
        `started`: when the step was launched (time.monotonic(); default `now`), for the stage times."""
        now = time.monotonic() if now is None else now
        started = now if started is None else started
        done = self._vision_done(out, now)
        self.token_gaps, self.first_token_waits = [], []
        self.stepped = 0
        live, results = self.live, out.sequences
        beams: dict[tuple[int, int], list[tuple[Sequence, SequenceOutput]]] = {}
        # The plan's works, not `running`: a sequence that left since (dropped) is skipped, and one
        # admitted since (a step planned ahead, EngineLoop's overlap) waits for its own step.
        for work in (*plan.decodes, *plan.prefills):
            seq, result = live.get(work.seq_id), results.get(work.seq_id)
            if seq is None or result is None:
                continue
            if work.beam_scores is not None:
                beams.setdefault((seq.state.num_rows, seq.state.keep), []).append((seq, result))
            elif seq.state.take(work, result):
                self._stepped(seq, out, now, started, done)
        answered = [(w, out.retrievals) for w in plan.retrievals] + [(w, out.scorings) for w in plan.scorings]
        for work, answers in answered:
            if (seq := live.get(work.seq_id)) is None:
                continue
            # Retrieval or scoring: answered in the step that admitted it.
            seq.output = answers.get(seq.seq_id)
            seq.finish_reason = FinishReason.STOP if seq.output is not None else FinishReason.ERROR
            seq.first_step(started, out, now)
            done.append(seq)
        for group in beams.values():
            advance_beams([s.state for s, _ in group], [r for _, r in group])
            for seq, _ in group:
                self._stepped(seq, out, now, started, done)
        for seq in done:
            seq.finished_at = now
        self._release(done)
        return done

    def _stepped(self, seq: Sequence, out: StepOutput, now: float, started: float, done: list) -> None:
        """A sequence gained tokens this step: its token-gap metrics, and `done` once it finished."""
        self.stepped += 1
        if seq.last_token_at is not None:
            self.token_gaps.append(now - seq.last_token_at)
        else:
            self.first_token_waits.append(now - seq.arrived)
            seq.first_step(started, out, now)
        seq.last_token_at = now
        if seq.state.finish_reason is not None:
            seq.finish_reason = seq.state.finish_reason
            done.append(seq)

    def _vision_done(self, out: StepOutput, now: float) -> list[Sequence]:
        """Requests whose image is encoded prefill next step; those whose vision batch failed fail."""
        for key in out.encoded:
            for seq in self.encoding.pop(key, []):
                if seq.finish_reason is None:
                    seq.stage = Stage.PREFILL
                    seq.vision_span = (seq.admitted or now, now)
            self.ready_images[key] = None
            self.ready_images.move_to_end(key)
        while len(self.ready_images) > READY_IMAGES:
            self.ready_images.popitem(last=False)
        failed = []
        for key in out.vision_errors:
            for seq in self.encoding.pop(key, []):
                if seq.finish_reason is None:
                    seq.finish_reason = FinishReason.ERROR
                    failed.append(seq)
        return failed

    def fail(self, plan: StepPlan, reason: FinishReason = FinishReason.ERROR) -> list[Sequence]:
        """A step raised: its sequences leave with `reason` and free their slots; the rest carry on."""
        ids = {w.seq_id for w in [*plan.prefills, *plan.decodes, *plan.retrievals, *plan.scorings]}
        failed = [s for s in self.running if s.seq_id in ids]
        for seq in failed:
            seq.finish_reason = reason
        self._release(failed)
        return failed

    def fail_all(self, reason: FinishReason = FinishReason.ERROR) -> list[Sequence]:
        """Fail every running sequence (after an error outside the model step)."""
        failed = list(self.running)
        for seq in failed:
            seq.finish_reason = reason
        self._release(failed)
        return failed

    def _release(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in gone]
        for s in seqs:
            self.live.pop(s.seq_id, None)
        for key, waiting in self.encoding.items():  # the key stays: its batch is still in flight
            self.encoding[key] = [s for s in waiting if id(s) not in gone]
        for s in seqs:
            for slot in s.slots:
                heapq.heappush(self.free_slots, slot)
            s.slots = []
