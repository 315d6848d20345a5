"""The scheduler owns every sequence's state: a mock runner returns plain token ids (as the real one
returns `SequenceOutput`s), and the scheduler appends them, ends sequences on their stop token,
max_new_tokens and min_new_tokens, frees their slots, and drops the token of a step run ahead of a
sequence's end (overlap)."""

from __future__ import annotations

from dataclasses import dataclass, field

from batching.scheduler import Scheduler, Stage
from model.decoding.generation import FinishReason, SamplingParams
from model.runtime.plan import SequenceOutput, StepOutput, StepPlan

EOS = 9


@dataclass
class Request:
    params: SamplingParams
    image_key: str = ""
    pixel_values: object = None
    text_ids: list[int] = field(default_factory=lambda: [1])
    prompt_ids: list[int] = field(default_factory=lambda: [1, 2])
    positions: int = 0


class ScriptRunner:
    """Each row's token at each step from a script: `script[seq_id][generated]` (EOS past its end).
    `launch` answers at once; `collect` hands the answer back, so steps can be launched ahead."""

    def __init__(self, script: dict[int, list[int]]):
        self.script = script
        self.plans: list[StepPlan] = []
        # Each launched work's `generated`, as the runner was told it (a running sequence's decode work
        # is one object, updated by the scheduler for each step: read at launch).
        self.told: list[int] = []

    def launch(self, plan: StepPlan) -> tuple[StepPlan, StepOutput]:
        self.plans.append(plan)
        out = StepOutput()
        for w in plan.prefills + plan.decodes:
            self.told.append(w.generated)
            seq = self.script[w.seq_id]
            token = seq[w.generated] if w.generated < len(seq) else EOS
            out.sequences[w.seq_id] = SequenceOutput([token] * len(w.slots))
        return plan, out

    def collect(self, launched: tuple[StepPlan, StepOutput]) -> StepOutput:
        return launched[1]


def scheduler(slots: int = 4) -> Scheduler:
    return Scheduler(slots, 8, 8, (EOS,), background_vision=False)


def run(sched: Scheduler, runner: ScriptRunner, ahead: bool = False) -> list:
    """Step until done; `ahead`: launch step n + 1 before reading step n (the engine loop's overlap)."""
    finished, inflight = [], None
    for _ in range(50):
        plan, dropped = sched.schedule()
        finished += dropped
        launched = runner.launch(plan) if not plan.is_empty() else None
        if inflight is not None:
            finished += sched.postprocess(inflight[0], runner.collect(inflight))
            inflight = None
        if launched is not None and ahead and plan.chainable:
            inflight = launched
        elif launched is not None:
            finished += sched.postprocess(plan, runner.collect(launched))
        if not sched.has_work and inflight is None:
            break
    return finished


def test_the_scheduler_ends_sequences_on_eos_and_max_tokens_and_frees_their_slots():
    sched = scheduler()
    a = sched.add(Request(SamplingParams(max_new_tokens=10)))
    b = sched.add(Request(SamplingParams(max_new_tokens=3)))
    runner = ScriptRunner({a.seq_id: [4, 5, EOS, 6], b.seq_id: [7, 7, 7, 7, 7]})
    finished = run(sched, runner)
    assert {s.seq_id for s in finished} == {a.seq_id, b.seq_id}
    assert a.outputs()[0].tokens == [4, 5, EOS] and a.finish_reason == FinishReason.STOP
    assert b.outputs()[0].tokens == [7, 7, 7] and b.finish_reason == FinishReason.LENGTH
    assert sorted(sched.free_slots) == [0, 1, 2, 3] and not sched.running
    assert a.stage == Stage.DECODE and a.finish_reason == "stop"  # str-valued: protocol text unchanged


def test_a_stop_token_before_min_new_tokens_does_not_end_the_sequence():
    sched = scheduler()
    seq = sched.add(Request(SamplingParams(max_new_tokens=10, min_new_tokens=3)))
    runner = ScriptRunner({seq.seq_id: [EOS] * 10})
    run(sched, runner)
    assert seq.outputs()[0].tokens == [EOS, EOS, EOS] and seq.finish_reason == FinishReason.STOP
    # The runner was told how many tokens each step had before it (its sampler blocks EOS below min).
    assert runner.told == [0, 1, 2]


def test_n_rows_end_on_their_own_and_the_request_when_all_do():
    sched = scheduler()
    seq = sched.add(Request(SamplingParams(do_sample=True, n=2, seed=0, max_new_tokens=4)))

    class Rows(ScriptRunner):  # row 0 stops at once, row 1 runs to max_new_tokens
        def launch(self, plan):
            out = StepOutput()
            for w in plan.prefills + plan.decodes:
                out.sequences[w.seq_id] = SequenceOutput([EOS if r == 0 else 5 for r in w.rows])
            self.plans.append(plan)
            return plan, out

    runner = Rows({})
    run(sched, runner)
    outs = seq.outputs()
    assert [o.tokens for o in outs] == [[EOS], [5, 5, 5, 5]]
    assert [o.finish_reason for o in outs] == ["stop", "length"] and seq.finish_reason == "length"
    assert [len(w.slots) for p in runner.plans for w in p.prefills + p.decodes] == [2, 1, 1, 1]
    assert all(p.chainable for p in runner.plans)  # n > 1 rows are chosen on the device


def test_overlap_drops_the_token_of_the_step_launched_past_the_end():
    for ahead in (False, True):
        sched = scheduler()
        seq = sched.add(Request(SamplingParams(max_new_tokens=10)))
        runner = ScriptRunner({seq.seq_id: [3, 4, EOS]})
        run(sched, runner, ahead=ahead)
        assert seq.outputs()[0].tokens == [3, 4, EOS] and seq.finish_reason == "stop"
        # With overlap the step after EOS was launched (before EOS was read) and its token dropped.
        assert len(runner.plans) == 3 + ahead
        assert seq.state.rows[0].pending == (1 if ahead else 0)  # never read: the sequence had left
        assert sorted(sched.free_slots) == [0, 1, 2, 3]


def test_overlap_never_launches_past_max_new_tokens():
    sched = scheduler()
    seq = sched.add(Request(SamplingParams(max_new_tokens=3)))
    runner = ScriptRunner({seq.seq_id: [3, 4, 5, 6]})
    run(sched, runner, ahead=True)
    assert seq.outputs()[0].tokens == [3, 4, 5] and seq.finish_reason == "length"
    assert len(runner.plans) == 3  # the launched tokens reached max_new_tokens: no fourth step


def test_beam_reorders_are_planned_as_data_for_the_next_step():
    sched = scheduler()
    seq = sched.add(Request(SamplingParams(num_beams=2, max_new_tokens=3)))

    class Beams(ScriptRunner):  # both candidates continue beam 1: slot of beam 0 takes beam 1's
        def launch(self, plan):
            out = StepOutput()
            for w in plan.prefills + plan.decodes:
                keep = w.sampling.keep
                out.sequences[w.seq_id] = SequenceOutput(
                    parents=[1] * keep,
                    candidates=list(range(3, 3 + keep)),
                    scores=[-1.0 - i for i in range(keep)],
                )
            self.plans.append(plan)
            return plan, out

    runner = Beams({})
    run(sched, runner)
    assert runner.plans[0].moves is None
    moves = runner.plans[1].moves
    assert moves.src == [1, 1]  # beam 1's slot, twice
    assert moves.dst == [0, 1] and moves.upto == 2  # the prompt; the new token is not cached yet
    assert not runner.plans[1].chainable and seq.finish_reason == "length"
