"""Batched, seeded sampling (`model.decoding.sampling`): the right distribution, equal to the per-row path, and
independent of the batch a row runs in."""

from __future__ import annotations

import random

import pytest
import torch

from model import Blip2Engine, SamplingParams
from model.decoding.sampling import M32, gumbel_noise, mix32, noise_key, sample, warp_rows


def test_tensor_hash_equals_the_integer_hash():
    values = [0, 1, 2**31 - 1, 2**31, M32] + [random.Random(0).getrandbits(32) for _ in range(200)]
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32(v) for v in values]
    assert all(0 <= v <= M32 for v in got)


def test_draws_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -float("inf")])
    probs = logits.softmax(-1)
    n = 20000
    # Many rows (keys) at one step, and one key over many steps: both must sample softmax(logits).
    across_keys = sample(logits.expand(n, -1), torch.arange(n), torch.zeros(n, dtype=torch.long))
    across_steps = sample(logits.expand(n, -1), torch.full((n,), noise_key(7)), torch.arange(n))
    for tokens in (across_keys, across_steps):
        freq = torch.bincount(tokens, minlength=6).float() / n
        sigma = (probs * (1 - probs) / n).sqrt()
        assert ((freq - probs).abs() <= 5 * sigma + 1e-9).all(), (freq, probs)
        assert freq[5] == 0  # -inf is never drawn


def test_noise_is_finite_and_a_function_of_key_and_step():
    keys, steps = torch.tensor([0, 1, M32, 12345]), torch.tensor([0, 0, 5, 2**40])
    noise = gumbel_noise(keys, steps, 4096)
    assert torch.isfinite(noise).all()
    assert torch.equal(noise, gumbel_noise(keys, steps, 4096))
    assert torch.equal(noise[2:3], gumbel_noise(keys[2:3], steps[2:3], 4096))  # batch-independent
    assert not torch.equal(noise[0], noise[1])
    assert noise_key(3) != noise_key(4) and noise_key(3, 1) == noise_key(4)  # sample i of n = seed + i


PARAMS = [(1.0, 50, 1.0), (0.7, 0, 0.8), (1.5, 5, 1.0), (1.0, 1, 0.3), (0.9, 1000, 0.95), (1.0, 0, 1.0)]


def test_batched_warps_equal_transformers_warpers_row_by_row():
    """Each row's temperature, top-k and top-p at once equal transformers' warpers on that row alone
    (those `generate` adds for the settings, in its order)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(len(PARAMS), 300, generator=torch.Generator().manual_seed(0)) * 3
    temps, ks, ps = zip(*PARAMS, strict=True)
    batched = warp_rows(logits, temps, ks, ps)
    for row, (t, k, p) in enumerate(PARAMS):
        ref = logits[row : row + 1]
        warpers = [
            (t != 1.0, TemperatureLogitsWarper, t),
            (k != 0, TopKLogitsWarper, k),
            (p < 1.0, TopPLogitsWarper, p),
        ]
        for on, warper, value in warpers:
            ref = warper(value)(None, ref) if on else ref
        assert torch.equal(batched[row : row + 1], ref), row


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))


def test_batched_and_per_row_sampling_draw_the_same_tokens(engine):
    """Logprobs send a row down the per-row path, min_new_tokens does so for its first tokens: neither
    changes the draw. Mixed into one batch with greedy rows, each equals its solo run."""
    pixels = list(torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5)))
    base = {
        "do_sample": True,
        "max_new_tokens": 10,
        "seed": 21,
        "temperature": 1.3,
        "top_k": 20,
        "top_p": 0.9,
    }
    batched = engine.generate(pixels[:1], None, SamplingParams(**base))[0].token_ids
    per_row = engine.generate(pixels[:1], None, SamplingParams(**base, logprobs=0))[0].token_ids
    assert batched == per_row
    floor = SamplingParams(**{**base, "min_new_tokens": 3})
    floor_per_row = SamplingParams(**{**base, "min_new_tokens": 3, "logprobs": 0})
    assert engine.generate(pixels[:1], None, floor)[0].token_ids == (
        engine.generate(pixels[:1], None, floor_per_row)[0].token_ids
    )
    mixed = engine.generate(pixels, None, [floor, SamplingParams(max_new_tokens=6), SamplingParams(**base)])
    assert mixed[0].token_ids == engine.generate(pixels[:1], None, floor)[0].token_ids
    assert mixed[2].token_ids == engine.generate(pixels[2:], None, SamplingParams(**base))[0].token_ids
