"""The engine loop's overlap: step n+1 planned and launched before step n's tokens are read back.

On the CPU a launch computes at once, so these tests check what overlap must not change (every request
returns what it returns alone, whatever mix of requests shares the steps) and that steps really were
launched ahead; the time it saves is a GPU measurement (`bench/gpu_suite.sh`).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from batching.scheduler import Scheduler
from model import Blip2Engine, SamplingParams
from model.runtime.runner import ModelRunner
from server.service import Service
from server.settings import Settings


@pytest.fixture(scope="module")
def root(checkpoints) -> str:
    return str(checkpoints("pre_ln")[0])


def mixed_params() -> list[SamplingParams]:
    """Plain greedy rows of unequal lengths beside every other kind of request (beams: not chainable)."""
    return [
        SamplingParams(max_new_tokens=3),
        SamplingParams(max_new_tokens=9, min_new_tokens=9),
        SamplingParams(max_new_tokens=6, min_new_tokens=2),
        SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=5, max_new_tokens=7),
        SamplingParams(max_new_tokens=8, min_new_tokens=8),
        SamplingParams(num_beams=2, max_new_tokens=5),
        SamplingParams(max_new_tokens=5, repetition_penalty=1.3),
        SamplingParams(do_sample=True, n=2, seed=1, max_new_tokens=4),
        SamplingParams(max_new_tokens=6, logprobs=2),
        SamplingParams(max_new_tokens=1),
    ]


def serve(root: str, requests, overlap: bool, slots: int = 6, metrics: list | None = None, on_finished=None):
    """The requests through an in-process engine; their outcomes and how many steps ran ahead (and,
    into `metrics`, the Prometheus texts after the warm-up and once the requests are done). With
    `on_finished`, it is called on the engine thread as each batch of finished sequences is reported
    (with them and the service), before the clients hear of them."""
    settings = Settings(model=root, device="cpu", engine="thread", max_running_seqs=slots, overlap=overlap)
    svc = Service.build(settings)
    assert svc.lifecycle.loop.overlap is overlap
    if on_finished is not None:
        report = svc.lifecycle.loop.on_finished
        svc.lifecycle.loop.on_finished = lambda seqs: (on_finished(seqs, svc), report(seqs))

    async def run():
        await svc.start()
        await svc.warm_up()
        try:
            if metrics is not None:
                metrics.append((await svc.lifecycle.render_metrics()).decode())
            outcomes = await svc.generate(requests)
            while (
                svc.lifecycle.loop.pending
            ):  # a request that ended at a stop string is aborted in the engine
                await asyncio.sleep(0.005)
            if metrics is not None:
                metrics.append((await svc.lifecycle.render_metrics()).decode())
            return outcomes
        finally:
            await svc.shutdown()

    return asyncio.run(run()), svc.lifecycle.loop.launched_ahead


def test_overlapped_steps_give_what_each_request_gives_alone(root):
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(10, 3, side, side, generator=torch.Generator().manual_seed(3)))
    params = mixed_params()
    # A stop string that the first request's text holds (its stop is found on the host, a step late).
    text = engine.tokenizer.decode(engine.generate([pixels[0]], None, params[0])[0].token_ids[:2])
    params[0] = SamplingParams(max_new_tokens=6, stop=(text[-2:],))
    requests = [
        engine.request(p, f"k{i}", None, pa) for i, (p, pa) in enumerate(zip(pixels, params, strict=True))
    ]
    outcomes, ahead = serve(root, requests, overlap=True)
    assert outcomes[0].result.finish_reason == "stop"
    assert ahead > 0, "no step was launched before the last one's tokens were read"
    for outcome, p, pa in zip(outcomes, pixels, params, strict=True):
        alone = engine.generate([p], None, pa)[0]
        got = [(o.token_ids, o.finish_reason) for o in outcome.result.outputs]
        assert got == [(o.token_ids, o.finish_reason) for o in alone.outputs], pa
        for o, a in zip(outcome.result.outputs, alone.outputs, strict=True):
            # Logprobs: the same tokens, values as close as a batch of other rows allows.
            assert [lp.token for lp in o.logprobs or []] == [lp.token for lp in a.logprobs or []]
            values = [lp.logprob for lp in o.logprobs or []]
            assert values == pytest.approx([lp.logprob for lp in a.logprobs or []], abs=1e-4)


def _sample(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def stop_string_requests(engine: Blip2Engine, seed: int) -> list:
    """8 greedy requests; the first ends by a stop string well before its max_new_tokens (with overlap,
    the step after it drops its token)."""
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(seed)))
    text = engine.tokenizer.decode(
        engine.generate([pixels[0]], None, SamplingParams(max_new_tokens=3))[0].token_ids
    )
    # Its complete characters (a trailing U+FFFD may be half of one: no stop string matches it yet).
    stop = (text[:-1] if text.endswith("\ufffd") else text)[-2:]
    params = [
        SamplingParams(max_new_tokens=9 if i == 0 else 3 + i % 4, stop=(stop,) if i == 0 else ())
        for i in range(8)
    ]
    return [
        engine.request(p, f"k{i}", None, pa) for i, (p, pa) in enumerate(zip(pixels, params, strict=True))
    ]


def test_metrics_count_each_token_and_queue_wait_once_with_overlap(root):
    """Dropped tokens are not counted, and no queue wait is lost to a step planned ahead: the counters
    after the requests are exactly theirs, with and without overlap. Several rounds (request timing,
    hence how they share steps, differs from round to round). The engine's tokens: the request cut at
    a stop string by the front end may run a step or two more in the engine before its abort lands."""
    engine = Blip2Engine.from_pretrained(root)
    for seed in (7, 8, 9):
        requests = stop_string_requests(engine, seed)
        for overlap in (True, False):
            texts: list[str] = []
            made: list[int] = []

            def count(seqs, svc, made=made) -> None:
                made.extend(len(s.outputs()[0].tokens) for s in seqs if s.request.image_key != "warmup")

            outcomes, ahead = serve(
                root, requests, overlap=overlap, slots=3, metrics=texts, on_finished=count
            )
            assert (ahead > 0) is overlap
            (warm, done), generated = texts, sum(made)
            assert generated >= sum(len(o.result.token_ids) for o in outcomes)
            assert outcomes[0].result.finish_reason == "stop" and len(outcomes[0].result.token_ids) <= 3
            waits = "blipserve_queue_wait_seconds_count"
            assert _sample(done, waits) - _sample(warm, waits) == len(requests)
            tokens = "blipserve_generated_tokens_total"
            assert _sample(done, tokens) - _sample(warm, tokens) == generated, (seed, overlap)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_request_is_counted_in_the_metrics_before_it_is_reported(root, overlap):
    """Forced timing for the race behind the test above: /metrics read the moment a request is
    reported finished (here: on the engine thread, as the report is made) already counts its tokens."""
    engine = Blip2Engine.from_pretrained(root)
    requests = stop_string_requests(engine, 7)
    seen: list[tuple[float, int]] = []  # (tokens counted, tokens of the requests finished so far)
    finished: list[int] = []

    def on_finished(seqs, svc) -> None:
        finished.extend(len(s.outputs()[0].tokens) for s in seqs if s.request.image_key != "warmup")
        seen.append((svc.client.metrics.tokens._value.get(), sum(finished)))

    texts: list[str] = []
    serve(root, requests, overlap=overlap, slots=3, metrics=texts, on_finished=on_finished)
    assert len(finished) == len(requests)
    total = _sample(texts[-1], "blipserve_generated_tokens_total")
    warm_up = total - sum(finished)  # the warm-up request's tokens
    assert all(counted >= warm_up + done for counted, done in seen[1:]), (warm_up, seen)
    assert seen[-1][0] == total


def test_overlap_off_never_launches_ahead_and_agrees(root):
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(4)))
    params = [SamplingParams(max_new_tokens=4 + i) for i in range(4)]
    requests = [
        engine.request(p, f"k{i}", None, pa) for i, (p, pa) in enumerate(zip(pixels, params, strict=True))
    ]
    on, ahead_on = serve(root, requests, overlap=True, slots=2)
    off, ahead_off = serve(root, requests, overlap=False, slots=2)
    assert ahead_on > 0 and ahead_off == 0
    assert [o.result.token_ids for o in on] == [o.result.token_ids for o in off]


def test_a_sequence_ended_by_its_stop_token_ran_one_step_more_whose_token_is_dropped(root):
    """Overlap's cost, made visible: the step after a sequence's last token still ran it."""
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = torch.randn(3, side, side, generator=torch.Generator().manual_seed(5))
    free = engine.generate([pixels], None, SamplingParams(max_new_tokens=8))[0].token_ids
    # A stop token of our choosing: the first generated token not seen before it.
    end = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    runner = engine.new_runner(2, 32, 0)
    scheduler = Scheduler(2, 4, 4, (free[end],), background_vision=False)
    seq = scheduler.add(engine.request(pixels, "k", None, SamplingParams(max_new_tokens=8)))
    launched = []
    while scheduler.has_work:  # the engine loop's overlap, spelled out: launch n + 1, then read n
        plan, _ = scheduler.schedule()
        if not plan.is_empty():
            launched.append(runner.launch(plan))
        if len(launched) > 1 or (launched and plan.is_empty()):
            older = launched.pop(0)
            scheduler.postprocess(older.plan, runner.collect(older))
    assert len(launched) == 1  # launched after the stop token, before it was read
    assert seq.finish_reason == "stop" and seq.outputs()[0].tokens == free[: end + 1]
    extra = runner.collect(launched[0])
    assert seq.seq_id in extra.sequences  # the runner sampled a token for it ...
    assert scheduler.postprocess(launched[0].plan, extra) == []
    assert seq.outputs()[0].tokens == free[: end + 1]  # ... which the scheduler dropped
    assert scheduler.stepped == 0


def test_offline_generate_with_overlap_equals_without(root, monkeypatch):
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(10, 3, side, side, generator=torch.Generator().manual_seed(6)))
    params = mixed_params()
    requests = [
        engine.request(p, f"k{i}", None, pa) for i, (p, pa) in enumerate(zip(pixels, params, strict=True))
    ]
    plain = [r for r, pa in zip(requests, params, strict=True) if pa.is_plain_greedy]
    calls: list[str] = []
    for name in ("launch", "collect"):
        method = getattr(ModelRunner, name)
        monkeypatch.setattr(
            ModelRunner, name, lambda self, x, m=method, n=name: calls.append(n) or m(self, x)
        )
    for batch, chainable in ((requests, False), (plain, True)):
        results = {}
        for overlap in (True, False):
            calls.clear()
            results[overlap] = engine.run_offline(batch, overlap=overlap)
            ahead = sum(
                c == "collect" and 2 * calls[:i].count("launch") - i == 2 for i, c in enumerate(calls)
            )
            if not overlap:
                assert ahead == 0
            elif chainable:
                assert ahead == calls.count("launch") - 1  # each step read after the next one's launch
            else:  # beams: read before the next launch while they run
                assert ahead < calls.count("launch") - 2
        assert [r.outputs for r in results[True]] == [r.outputs for r in results[False]]


def test_a_step_launched_behind_the_last_request_is_read_when_it_ends(root):
    """The last running request ends by a stop string while the step after it is in flight: that step
    is read at once (its token dropped), not left pending until the next request arrives."""
    engine = Blip2Engine.from_pretrained(root)
    request = stop_string_requests(engine, 7)[0]
    settings = Settings(model=root, device="cpu", engine="thread", max_running_seqs=2, overlap=True)
    svc = Service.build(settings)

    async def run():
        await svc.start()
        await svc.warm_up()
        try:
            return await svc.generate([request])
        finally:
            await svc.shutdown()

    (outcome,) = asyncio.run(run())
    assert outcome.result.finish_reason == "stop" and svc.lifecycle.loop.launched_ahead > 0
    assert svc.lifecycle.loop._inflight is None
    assert len(outcome.result.token_ids) < request.params.max_new_tokens


def test_a_sequence_cancelled_while_a_step_runs_ahead_gains_no_token(root):
    """Cancelled after step n+1 was launched: step n's token counts (it was read as the sequence ran),
    step n+1's is dropped, as for a stop: the same tokens as without overlap, whenever the cancel comes."""
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = torch.randn(3, side, side, generator=torch.Generator().manual_seed(5))
    runner = engine.new_runner(2, 32, 0)
    scheduler = Scheduler(2, 4, 4, engine.eos_ids, background_vision=False)
    seq = scheduler.add(engine.request(pixels, "k", None, SamplingParams(max_new_tokens=8)))
    prefill = runner.launch(scheduler.schedule()[0])  # step n: the prefill picks the first token
    ahead = runner.launch(scheduler.schedule()[0])  # step n+1, launched before step n is read
    scheduler.postprocess(prefill.plan, runner.collect(prefill))
    assert len(seq.outputs()[0].tokens) == 1
    seq.cancelled = True
    plan, dropped = scheduler.schedule()  # step n+2 is planned before step n+1 is read
    assert dropped == [seq] and plan.is_empty()
    assert seq.seq_id in (out := runner.collect(ahead)).sequences
    assert scheduler.postprocess(ahead.plan, out) == [] and scheduler.stepped == 0
    assert len(seq.outputs()[0].tokens) == 1 and seq.finish_reason == "cancelled"


def test_n_samples_logprobs_min_new_tokens_and_penalties_chain_and_give_the_same_tokens(root, monkeypatch):
    """n > 1, logprobs (greedy and sampled), min_new_tokens, repetition penalty and no-repeat n-grams
    (whose token histories live on the device) are chosen on the device by the batched sampler: every
    step of such a batch is launched before the last one is read, and the outputs (tokens, finish
    reasons, logprobs) equal those without overlap and those of each request alone."""
    engine = Blip2Engine.from_pretrained(root)
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(8)))
    params = [
        SamplingParams(do_sample=True, n=3, seed=2, top_k=10, max_new_tokens=6),
        SamplingParams(max_new_tokens=5, logprobs=3),
        SamplingParams(do_sample=True, temperature=0.7, seed=4, max_new_tokens=5, logprobs=2),
        SamplingParams(max_new_tokens=7, min_new_tokens=7),
        SamplingParams(do_sample=True, n=2, seed=9, max_new_tokens=4, min_new_tokens=3, logprobs=1),
        SamplingParams(max_new_tokens=9, repetition_penalty=1.6),
        SamplingParams(max_new_tokens=8, no_repeat_ngram_size=1, logprobs=1),
        SamplingParams(
            do_sample=True, n=2, seed=3, max_new_tokens=7, repetition_penalty=0.7, no_repeat_ngram_size=2
        ),
    ]
    prompts = [None] * 6 + ["a photo of", "a picture of a"]  # histories of unequal lengths
    requests = [
        engine.request(p, f"k{i}", pr, pa)
        for i, (p, pr, pa) in enumerate(zip(pixels, prompts, params, strict=True))
    ]
    calls: list[str] = []
    for name in ("launch", "collect"):
        method = getattr(ModelRunner, name)
        monkeypatch.setattr(
            ModelRunner, name, lambda self, x, m=method, n=name: calls.append(n) or m(self, x)
        )
    results = {}
    for overlap in (True, False):
        calls.clear()
        results[overlap] = engine.run_offline(requests, overlap=overlap)
        ahead = sum(c == "collect" and 2 * calls[:i].count("launch") - i == 2 for i, c in enumerate(calls))
        assert ahead == (calls.count("launch") - 1 if overlap else 0)
    assert [r.outputs for r in results[True]] == [r.outputs for r in results[False]]
    for result, p, pr, pa in zip(results[True], pixels, prompts, params, strict=True):
        alone = engine.generate([p], [pr], pa)[0]
        assert [(o.token_ids, o.finish_reason) for o in result.outputs] == [
            (o.token_ids, o.finish_reason) for o in alone.outputs
        ]
        for o, a in zip(result.outputs, alone.outputs, strict=True):
            assert [lp.token for lp in o.logprobs or []] == [lp.token for lp in a.logprobs or []]
            got, want = [lp.logprob for lp in o.logprobs or []], [lp.logprob for lp in a.logprobs or []]
            assert got == pytest.approx(want, abs=1e-4)
