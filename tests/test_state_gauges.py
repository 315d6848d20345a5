"""/metrics' state gauges (queue depth, active sequences, free KV slots) follow every change of the
scheduler's state: a step, cancelled or expired sequences dropped with nothing left to run, a failed
step. Driven step by step on the in-process engine (no threads, no timing)."""

from __future__ import annotations

import time

import pytest
import torch

from batching.engine_process import build_engine_core
from batching.metrics import Metrics
from model import Blip2Engine, SamplingParams
from server.settings import Settings

GAUGES = ("blipserve_queue_depth", "blipserve_active_sequences", "blipserve_free_kv_slots")


@pytest.fixture(scope="module")
def engine():
    return Blip2Engine.from_pretrained()  # tiny-random


def test_gauges_follow_drops_and_failures(engine, monkeypatch):
    metrics = Metrics()
    settings = Settings(model="tiny-random", device="cpu", max_running_seqs=4, max_wait_ms=0)
    loop = build_engine_core(settings, engine, metrics)
    side = engine.image_processor
    pixels = torch.rand(3, side.height, side.width)

    def add(count: int) -> list:
        params = SamplingParams(max_new_tokens=50)
        return [loop.add(engine.request(pixels, "k", None, params), stream=True) for _ in range(count)]

    def gauges() -> tuple[float, ...]:
        return tuple(metrics.registry.get_sample_value(name) for name in GAUGES)

    assert gauges() == (0, 0, 4)  # before any step
    seqs = add(6)
    assert gauges() == (6, 0, 4)  # queued, not stepped yet
    loop.step()
    loop.step()
    assert gauges() == (2, 4, 0)
    # Clients gone: the next step only drops them (nothing left to run, no step hook).
    for seq in seqs:
        loop.cancel(seq)
    loop.step()
    assert gauges() == (0, 0, 4) and not loop.has_work

    # Deadlines passed (a 504): dropped likewise.
    seqs = add(3)
    loop.step()
    assert gauges() == (0, 3, 1)
    for seq in seqs:
        seq.deadline = time.monotonic() - 1
    loop.step()
    assert gauges() == (0, 0, 4) and all(s.finish_reason is not None for s in seqs)

    # A step that raises fails its sequences: their slots are free at once.
    add(2)
    loop.step()
    assert gauges() == (0, 2, 2)

    def broken(plan):
        raise RuntimeError("device lost")

    monkeypatch.setattr(loop.runner, "launch", broken)
    loop.step()
    assert gauges() == (0, 0, 4) and not loop.has_work
