"""Scheduler and engine loop on a mock model (no tensors maths): continuous batching semantics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from batching import EngineCore, InprocClient, QueueFull, Scheduler, SequenceFailed
from model.decoding.generation import SamplingParams
from model.runtime.plan import SequenceOutput, StepOutput, StepPlan

EOS = 99


@dataclass
class FakeRequest:
    """Emits tokens 1, 2, 3, ... and stops after `stop_after` tokens with EOS."""

    stop_after: int
    image_key: str = "img"
    pixel_values: object = None
    text_ids: list[int] = field(default_factory=lambda: [2])
    prompt_ids: list[int] = field(default_factory=lambda: [50, 50, 2])
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=50))
    positions: int = 0


class FakeRunner:
    """Stands in for ModelRunner: checks the plan's invariants and returns plain token ids, as the
    runner does: 1, 2, 3, ... per row, then EOS after the `stop_after` its prompt says (`request`)."""

    def __init__(self, step_s: float = 0.0):
        self.plans: list[StepPlan] = []
        self.step_s = step_s
        self.stops: dict[int, int] = {}  # seq_id -> stop_after, read from its prefill's text ids

    def run(self, plan: StepPlan) -> StepOutput:
        time.sleep(self.step_s)
        self.plans.append(plan)
        slots = [s for w in plan.prefills + plan.decodes for s in w.slots]
        assert len(slots) == len(set(slots)), "a cache slot is used twice in one step"
        if any(w.image_key == "bad" for w in plan.prefills + plan.decodes):
            raise RuntimeError("boom")
        out = StepOutput(encoded=list(plan.encode))  # the vision stage, done at once
        for w in plan.prefills:
            self.stops[w.seq_id] = w.text_ids[0] - 50 if w.text_ids[0] > 50 else 1_000
        for w in plan.prefills + plan.decodes:
            n = w.generated + 1
            token = EOS if n > self.stops[w.seq_id] else n
            out.sequences[w.seq_id] = SequenceOutput([token] * len(w.slots))
        return out

    # The engine loop's two halves: this fake computes everything at launch.
    launch = run

    def collect(self, out: StepOutput) -> StepOutput:
        return out


def request(stop_after: int, key: str = "img") -> FakeRequest:
    return FakeRequest(stop_after, key, text_ids=[50 + stop_after], prompt_ids=[50 + stop_after, 50, 2])


def drive(scheduler: Scheduler, runner: FakeRunner, steps: int = 100) -> list:
    finished = []
    for _ in range(steps):
        plan, dropped = scheduler.schedule()
        finished += dropped
        if plan.is_empty():
            break
        finished += scheduler.postprocess(plan, runner.run(plan))
    return finished


@pytest.mark.parametrize("background", [False, True])
def test_sequences_join_and_leave_the_running_batch(background):
    sched = Scheduler(
        num_slots=2, max_queue=10, max_batch_images=8, eos_ids=(EOS,), background_vision=background
    )
    runner = FakeRunner()
    long, short, late = request(6), request(1), request(2)
    seqs = [sched.add(r) for r in (long, short, late)]
    finished = drive(sched, runner)
    assert [s.outputs()[0].tokens for s in seqs] == [[1, 2, 3, 4, 5, 6, EOS], [1, EOS], [1, 2, EOS]]
    assert all(s.finish_reason == "stop" for s in finished)
    # The third request starts as soon as the short one leaves, while the long one is still running
    # (in the background, the first two prefill a step later, once their image is encoded; the third's
    # image is known by then).
    first_prefill = {w.seq_id: i for i, p in enumerate(runner.plans) for w in p.prefills}
    assert first_prefill[seqs[2].seq_id] == 2 + background
    assert len(sched.free_slots) == 2 and not sched.running


def test_admission_waits_for_free_slots_and_limits_images():
    sched = Scheduler(num_slots=3, max_queue=10, max_batch_images=2, eos_ids=(EOS,), background_vision=False)
    for key in "abcd":
        sched.add(request(3, key))
    plan, _ = sched.schedule()
    assert [w.image_key for w in plan.prefills] == ["a", "b"]  # vision batch capped at 2 new images
    plan, _ = sched.schedule()
    assert [w.image_key for w in plan.prefills] == ["c"]  # only one slot left
    assert len(sched.waiting) == 1


def test_same_image_rides_along_in_the_vision_batch():
    sched = Scheduler(num_slots=8, max_queue=10, max_batch_images=1, eos_ids=(EOS,), background_vision=False)
    for key in "aab":
        sched.add(request(2, key))
    plan, _ = sched.schedule()
    assert [w.image_key for w in plan.prefills] == ["a", "a"]
    assert list(plan.images) == ["a"]


def test_background_vision_batches_newcomers_while_the_running_decode():
    sched = Scheduler(num_slots=8, max_queue=10, max_batch_images=4, eos_ids=(EOS,), background_vision=True)
    first = [sched.add(request(20, k)) for k in "ab"]
    plan, _ = sched.schedule()
    # Admitted (slots held) but not prefilled: their images go to the background vision stage.
    assert plan.encode == ["a", "b"] and not plan.prefills and set(plan.images) == {"a", "b"}
    assert all(s.slots for s in first) and plan.awaits_vision
    sched.postprocess(plan, StepOutput())  # the batch is still running
    late = [sched.add(request(20, k)) for k in "cdea"]
    plan, _ = sched.schedule()
    # One batch in flight at a time: "c" waits in the queue; "a" (in flight) could not pass it (FIFO).
    assert plan.encode == [] and not plan.prefills and len(sched.waiting) == 4
    sched.postprocess(plan, StepOutput(encoded=["a", "b"]))
    plan, _ = sched.schedule()
    # The first two prefill, and so does the late "a", whose image is known now.
    assert [w.image_key for w in plan.prefills] == ["a", "b", "a"]
    assert plan.encode == ["c", "d", "e"]  # the newcomers, as one batch
    assert [s.stage for s in late] == ["vision", "vision", "vision", "decode"]
    out = FakeRunner().run(plan)
    out.encoded = []  # the newcomers' batch is still running
    sched.postprocess(plan, out)
    plan, _ = sched.schedule()
    # They decode while the newcomers' batch is still in flight.
    keys = {s.seq_id: s.request.image_key for s in sched.running}
    assert [keys[w.seq_id] for w in plan.decodes] == ["a", "b", "a"] and not plan.prefills
    sched.postprocess(plan, StepOutput(vision_errors={"c": "OutOfMemoryError: simulated"}))
    assert late[0].finish_reason == "error" and not late[0].slots  # only that image's request fails
    assert late[1].finish_reason is None and "d" in sched.encoding


def test_queue_is_bounded():
    sched = Scheduler(num_slots=1, max_queue=2, max_batch_images=1, eos_ids=(EOS,), background_vision=False)
    sched.add(request(1))
    sched.add(request(1))
    with pytest.raises(QueueFull):
        sched.add(request(1))


def test_beams_take_one_slot_each_and_too_many_beams_is_an_error():
    sched = Scheduler(num_slots=4, max_queue=5, max_batch_images=4, eos_ids=(EOS,), background_vision=False)
    r = request(2)
    r.params = SamplingParams(num_beams=3)
    sched.add(r)
    plan, _ = sched.schedule()
    assert len(plan.prefills[0].slots) == 3 and len(sched.free_slots) == 1
    r5 = request(2)
    r5.params = SamplingParams(num_beams=5)
    with pytest.raises(ValueError, match="num_beams"):
        sched.add(r5)


def test_cancel_and_deadline_free_slots_at_next_step():
    sched = Scheduler(num_slots=2, max_queue=5, max_batch_images=4, eos_ids=(EOS,), background_vision=False)
    a, b = sched.add(request(50)), sched.add(request(50), deadline=0.0)
    runner = FakeRunner()
    plan, dropped = sched.schedule(now=-1.0)
    sched.postprocess(plan, runner.run(plan))
    a.cancelled = True
    plan, dropped = sched.schedule(now=1.0)
    assert {s.finish_reason for s in dropped} == {"cancelled", "timeout"}
    assert plan.is_empty() and sorted(sched.free_slots) == [0, 1]
    assert b.slots == [] and a.slots == []


def test_failed_step_fails_only_its_sequences():
    sched = Scheduler(num_slots=4, max_queue=5, max_batch_images=4, eos_ids=(EOS,), background_vision=False)
    bad = sched.add(request(3, "bad"))
    plan, _ = sched.schedule()
    with pytest.raises(RuntimeError):
        FakeRunner().run(plan)
    assert sched.fail(plan) == [bad] and bad.finish_reason == "error"
    good = sched.add(request(2))
    drive(sched, FakeRunner())
    assert good.finish_reason == "stop" and len(sched.free_slots) == 4


def test_engine_core_serves_concurrent_requests_and_survives_a_failing_step():
    async def main():
        sched = Scheduler(num_slots=3, max_queue=50, max_batch_images=4, eos_ids=(EOS,))
        runner = FakeRunner()
        loop = InprocClient(EngineCore(runner, sched, max_wait_ms=1))
        loop.start()
        done = await asyncio.gather(*(loop.submit(request(n % 5 + 1)) for n in range(20)))
        assert [len(d.outputs[0].tokens) for d in done] == [n % 5 + 2 for n in range(20)]
        with pytest.raises(SequenceFailed):
            await loop.submit(request(2, "bad"))
        ok = await loop.submit(request(2))
        assert ok.finish_reason == "stop"
        loop.shutdown()
        assert loop.healthy

    asyncio.run(main())


def test_engine_core_cancellation_frees_the_slot():
    async def main():
        sched = Scheduler(num_slots=1, max_queue=5, max_batch_images=4, eos_ids=(EOS,))
        loop = InprocClient(EngineCore(FakeRunner(step_s=0.002), sched, max_wait_ms=0))
        loop.start()
        endless = request(10_000)
        endless.params = SamplingParams(max_new_tokens=100_000)
        task = asyncio.create_task(loop.submit(endless))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        done = await asyncio.wait_for(loop.submit(request(1)), 5)  # the only slot is free again
        assert done.finish_reason == "stop"
        loop.shutdown()

    asyncio.run(main())


def test_engine_core_survives_an_error_outside_the_model_step():
    async def main():
        sched = Scheduler(num_slots=2, max_queue=5, max_batch_images=4, eos_ids=(EOS,))
        calls = []

        def broken_hook(plan, out, scheduler):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("hook failed")

        loop = InprocClient(EngineCore(FakeRunner(), sched, max_wait_ms=0, on_step=broken_hook))
        loop.start()
        with pytest.raises(SequenceFailed):
            await asyncio.wait_for(loop.submit(request(5)), 5)
        ok = await asyncio.wait_for(loop.submit(request(1)), 5)
        assert ok.finish_reason == "stop" and len(sched.free_slots) == 2
        loop.shutdown()

    asyncio.run(main())


def test_backstop_deadline_when_the_engine_stalls():
    async def main():
        sched = Scheduler(num_slots=1, max_queue=5, max_batch_images=4, eos_ids=(EOS,))
        loop = InprocClient(EngineCore(FakeRunner(), sched))  # never started: nothing will ever run
        import batching.client as el

        el.BACKSTOP_S, saved = 0.0, el.BACKSTOP_S
        try:
            with pytest.raises(SequenceFailed, match="timeout"):
                await loop.submit(request(1), timeout_s=0.05)
        finally:
            el.BACKSTOP_S = saved

    asyncio.run(main())


def test_due_in_says_when_the_next_step_runs_and_drained_when_the_loop_may_end():
    """`EngineCore.due_in`: None with nothing to run; an idle engine waits for a fuller vision batch up
    to max_wait from the oldest arrival, not past a full batch, a running sequence or a stop; `drained`
    once stopped with nothing left."""
    sched = Scheduler(num_slots=4, max_queue=8, max_batch_images=3, eos_ids=(EOS,))
    loop = EngineCore(FakeRunner(), sched, max_wait_ms=500)
    assert loop.due_in() is None and not loop.drained
    loop.add(request(1, "a"))
    assert 0.4 < loop.due_in() <= 0.5
    sched.waiting[0].arrived -= 0.45  # the oldest came 450 ms ago: 50 ms left
    assert 0 < loop.due_in() <= 0.05
    sched.waiting[0].arrived -= 0.1
    assert loop.due_in() == 0
    sched.waiting[0].arrived += 0.1  # 450 ms ago: 50 ms left again
    urgent = request(1, "u")
    urgent.priority = 5  # goes ahead of "a" in the queue, and must not restart the wait
    loop.add(urgent)
    assert sched.waiting[0].request is urgent and 0 < loop.due_in() <= 0.05
    sched.waiting.remove(sched.waiting[0])
    loop.add(request(1, "b"))
    loop.add(request(1, "c"))  # a full vision batch (3)
    assert loop.due_in() == 0
    loop.step()  # all three prefill and now run
    assert sched.running and loop.due_in() == 0
    loop.add(request(1, "d"))
    assert loop.due_in() == 0  # no waiting for newcomers while sequences run
    assert EngineCore(FakeRunner(), sched, max_wait_ms=0).due_in() == 0
    idle = EngineCore(FakeRunner(), Scheduler(4, 8, 3, (EOS,)), max_wait_ms=0)
    idle.add(request(1, "e"))
    assert idle.due_in() == 0  # no max wait: an idle engine steps at once
    idle = EngineCore(FakeRunner(), Scheduler(4, 8, 3, (EOS,)), max_wait_ms=500)
    idle.add(request(1, "f"))
    idle.add(request(1, "g"), timeout_s=0.3)  # the wait leaves it half its 300 ms to run
    assert 0.1 < idle.due_in() <= 0.15
    idle.stop_accepting(drain=True)
    assert idle.due_in() == 0  # a stop ends the wait
    loop.stop_accepting(drain=True)
    assert loop.due_in() == 0 and not loop.drained
    while loop.due_in() is not None:
        loop.step()
    assert loop.drained and not sched.has_work
