"""The fixed-shape decode step (`model.runtime.static_decode`): equal to the gathered step, leaves idle slots
untouched, and is capturable as a CUDA graph (no host sync, no host->device copy inside the step)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import Blip2Engine
from model.arch.kv_cache import CrossCache
from model.runtime.static_decode import StaticDecoder, kv_buckets, row_buckets

NUM_SLOTS, MAX_LEN = 8, 40


def test_bucket_ladders():
    assert row_buckets(1) == [1]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert kv_buckets(100, 32) == [32, 64, 96, 100]
    assert kv_buckets(64, 32) == [32, 64]
    with pytest.raises(ValueError, match="kv_step"):
        kv_buckets(64, 0)


@pytest.fixture(scope="module", params=["pre_ln", "t5", "blip_caption"])
def model(request, checkpoints):
    return Blip2Engine.from_pretrained(str(checkpoints(request.param)[0])).model


def _random_cache(model, seed: int):
    """A cache whose every slot holds random keys/values (and, for cross caches, source lengths)."""
    cache = model.new_cache(NUM_SLOTS + 1, MAX_LEN)
    gen = torch.Generator().manual_seed(seed)
    parts = [cache.own, cache.cross] if isinstance(cache, CrossCache) else [cache]
    for part in parts:
        part.k.copy_(torch.randn(part.k.shape, generator=gen))
        part.v.copy_(torch.randn(part.v.shape, generator=gen))
    if isinstance(cache, CrossCache):
        cache.lengths.copy_(torch.randint(1, cache.cross.max_len + 1, (NUM_SLOTS + 1,), generator=gen))
    return cache


def _tensors(cache) -> list[torch.Tensor]:
    if isinstance(cache, CrossCache):
        return [cache.own.k, cache.own.v, cache.cross.k, cache.cross.v, cache.lengths]
    return [cache.k, cache.v]


def test_static_step_equals_gathered_step_and_touches_only_live_slots(model):
    tokens, positions, slots = [5, 9, 3], [7, 2, 35], [5, 0, 3]  # scattered slots, unequal lengths
    gathered_cache = _random_cache(model, seed=1)
    static_cache = _random_cache(model, seed=1)
    before = [t.clone() for t in _tensors(static_cache)]
    with torch.inference_mode():
        want = model.decode(
            torch.tensor(tokens),
            torch.tensor(positions),
            torch.tensor(slots),
            gathered_cache,
            max(positions) + 1,
        )
    static = StaticDecoder(model.decode, static_cache, NUM_SLOTS, kv_step=16, graphs=False)
    assert static.bucket(max(slots), max(positions) + 1) == (8, 40)
    got = static.run(positions, slots, slots, tokens)  # every token written by the host
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Live slots hold what the gathered step wrote; every other slot but the trash slot is unchanged.
    kept, idle = torch.arange(NUM_SLOTS), torch.tensor([s for s in range(NUM_SLOTS) if s not in slots])
    for s, g, old in zip(_tensors(static_cache), _tensors(gathered_cache), before, strict=True):
        dim = 1 if s.dim() == 5 else 0  # [layers, slots, heads, len, head_dim] or lengths [slots]
        torch.testing.assert_close(s.index_select(dim, kept), g.index_select(dim, kept))
        assert torch.equal(s.index_select(dim, idle), old.index_select(dim, idle))


# Ops that read a device value back to the host (a sync, and a graph capture error) or copy host data to the
# device (not allowed while capturing): none may run inside the step a graph captures.
HOST_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "lift_fresh", "unique"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_host_syncs():
    x = torch.arange(4.0)
    with RecordOps() as rec:
        x.sum().item()
        torch.nonzero(x > 1)
        torch.tensor([1, 2])
    assert {"_local_scalar_dense", "nonzero", "lift_fresh"} <= rec.names


def test_the_static_step_has_no_host_sync_or_host_copy(model):
    cache = _random_cache(model, seed=2)
    static = StaticDecoder(model.decode, cache, NUM_SLOTS, kv_step=16, graphs=False)
    static.run([7, 20], [1, 4], [1, 4], [5, 9])  # fills the static inputs as a real step does
    with torch.inference_mode(), RecordOps() as rec:
        out = static.step(8, 32)
    assert out.shape[0] == 8
    assert not (rec.names & HOST_OPS), sorted(rec.names & HOST_OPS)


def test_cache_needs_the_trash_slot_and_graphs_need_cuda(model):
    with pytest.raises(ValueError, match="num_slots \\+ 1"):
        StaticDecoder(model.decode, model.new_cache(NUM_SLOTS, MAX_LEN), NUM_SLOTS, 16, graphs=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            StaticDecoder(model.decode, model.new_cache(NUM_SLOTS + 1, MAX_LEN), NUM_SLOTS, 16, graphs=True)


def test_static_and_gathered_runners_generate_the_same(checkpoints):
    """Whole requests (greedy, beams, samples, unequal prompts) through both decode paths."""
    from model import SamplingParams
    from model.runtime.options import DecodeOptions

    engine = Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))
    pixels = list(torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3)))
    prompts = [None, "a photo of two", "Question: what is it? Answer:"]
    params = [
        SamplingParams(max_new_tokens=9),
        SamplingParams(max_new_tokens=7, num_beams=3),
        SamplingParams(max_new_tokens=6, do_sample=True, n=2, seed=4),
    ]
    results = {}
    for static in (True, False):
        engine.decode_options = DecodeOptions(static=static)
        results[static] = [[c.token_ids for c in r.outputs] for r in engine.generate(pixels, prompts, params)]
    assert results[True] == results[False]
