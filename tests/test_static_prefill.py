"""The fixed-shape prefill (`model.runtime.static_prefill`): equal to the eager prefill, writes only the live slots
(and the trash slot), and is capturable as a CUDA graph (no host sync, no host->device copy inside it)."""

from __future__ import annotations

import pytest
import torch
from test_static_decode import HOST_OPS, RecordOps

from model import Blip2Engine, SamplingParams
from model.runtime.options import DecodeOptions
from model.runtime.static_prefill import StaticPrefill, length_buckets

NUM_SLOTS, MAX_LEN = 6, 64


def test_length_buckets():
    assert length_buckets(32, 128) == [40, 48, 64, 96, 128]
    assert length_buckets(32, 41) == [40, 41]
    assert length_buckets(4, 12) == [12]
    with pytest.raises(ValueError, match="no room"):
        length_buckets(32, 32)


@pytest.fixture(scope="module")
def model(checkpoints):
    return Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0])).model


def _static(model, cache, max_rows: int = 32) -> StaticPrefill:
    shape = (model.cfg.num_query_tokens, model.cfg.text_hidden)
    return StaticPrefill(model.prefill_static, cache, NUM_SLOTS, shape, cache.k.dtype, max_rows, graphs=False)


def _inputs(model, n: int, seed: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    queries = [
        torch.randn(model.cfg.num_query_tokens, model.cfg.text_hidden, generator=gen) for _ in range(n)
    ]
    texts = [[2, *torch.randint(3, 90, (k,), generator=gen).tolist()] for k in (0, 5, 11, 2, 7)[:n]]
    return queries, texts


@pytest.mark.parametrize("max_rows", [32, 2])  # one bucket of 4 rows; chunks of 2
def test_static_prefill_equals_the_eager_prefill_and_writes_only_live_slots(model, max_rows):
    queries, texts = _inputs(model, 3, seed=1)
    slots = [4, 0, 2]
    eager_cache, static_cache = (
        model.new_cache(NUM_SLOTS + 1, MAX_LEN),
        model.new_cache(NUM_SLOTS + 1, MAX_LEN),
    )
    for c in (eager_cache, static_cache):
        c.k.normal_(generator=torch.Generator().manual_seed(2))
        c.v.normal_(generator=torch.Generator().manual_seed(3))
    before = static_cache.k.clone(), static_cache.v.clone()
    with torch.inference_mode():
        inputs = [model.prompt_inputs(q, t) for q, t in zip(queries, texts, strict=True)]
        want = model.prefill(inputs, torch.tensor(slots), eager_cache)
    static = _static(model, static_cache, max_rows)
    got = static.run(queries, texts, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    nq = model.cfg.num_query_tokens
    for slot, text in zip(slots, texts, strict=True):  # each prompt's keys/values, as the eager prefill's
        n = nq + len(text)
        torch.testing.assert_close(static_cache.k[:, slot, :, :n], eager_cache.k[:, slot, :, :n])
        torch.testing.assert_close(static_cache.v[:, slot, :, :n], eager_cache.v[:, slot, :, :n])
    idle = [s for s in range(NUM_SLOTS) if s not in slots]  # every slot but the live ones and the trash
    assert torch.equal(static_cache.k[:, idle], before[0][:, idle])
    assert torch.equal(static_cache.v[:, idle], before[1][:, idle])


def test_the_static_prefill_has_no_host_sync_or_host_copy(model):
    static = _static(model, model.new_cache(NUM_SLOTS + 1, MAX_LEN))
    queries, texts = _inputs(model, 2, seed=4)
    static.run(queries, texts, [1, 3])  # fills the static inputs as a real prefill does
    rows, length = static.bucket(2, model.cfg.num_query_tokens + 6)
    with torch.inference_mode(), RecordOps() as rec:
        out = static.step(rows, length)
    assert out.shape[0] == rows
    assert not (rec.names & HOST_OPS), sorted(rec.names & HOST_OPS)


def test_bad_inputs_are_refused(model):
    static = _static(model, model.new_cache(NUM_SLOTS + 1, MAX_LEN))
    queries, texts = _inputs(model, 2, seed=5)
    with pytest.raises(ValueError, match="equal non-zero lengths"):
        static.run(queries, texts, [1])
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        static.run(queries[:1], [[2] * MAX_LEN], [1])
    with pytest.raises(ValueError, match="num_slots \\+ 1"):
        _static(model, model.new_cache(NUM_SLOTS, MAX_LEN))
    with pytest.raises(ValueError, match="rows, positions"):
        model.prefill_static(torch.zeros(2, 40, dtype=torch.long), queries[0][None], None, None, None)


def test_generate_through_the_static_prefill_equals_the_eager_one(checkpoints, monkeypatch):
    """Whole requests (greedy, beams, samples, prompts of unequal length) with the runner's prefill
    swapped for the fixed-shape one (on CUDA it is a graph replay; on the CPU the runner prefills eagerly)."""
    import model.runtime.runner as runner_module

    engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    side = engine.cfg.vision.image_size
    pixels = list(torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(3)))
    prompts = [None, "a photo of two", "Question: what is it? Answer:"]
    params = [
        SamplingParams(max_new_tokens=9),
        SamplingParams(max_new_tokens=7, num_beams=3),
        SamplingParams(max_new_tokens=6, do_sample=True, n=2, seed=4),
    ]
    want = [[c.token_ids for c in r.outputs] for r in engine.generate(pixels, prompts, params)]
    built = []

    def static_on_cpu(self, *args, **kwargs):
        original(self, *args, **kwargs)
        shape = (self.model.cfg.num_query_tokens, self.model.cfg.text_hidden)
        num_slots = self.cache.k.shape[1] - 1
        self.static_prefill = StaticPrefill(
            self.model.prefill_static, self.cache, num_slots, shape, self.cache.k.dtype, graphs=False
        )
        built.append(self.static_prefill)

    original = runner_module.ModelRunner.__init__
    monkeypatch.setattr(runner_module.ModelRunner, "__init__", static_on_cpu)
    engine.decode_options = DecodeOptions(kv_step=8)  # a runner of its own
    got = [[c.token_ids for c in r.outputs] for r in engine.generate(pixels, prompts, params)]
    assert built and got == want
