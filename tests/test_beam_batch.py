"""Beam requests scored together (one log-softmax and top-k for all of them, one cache copy for all
their reorders) give what each gives alone, next to requests on the per-request path."""

from __future__ import annotations

import pytest
import torch

from model import Blip2Engine, SamplingParams


@pytest.mark.parametrize("variant", ["pre_ln", "t5", "blip_caption"])
def test_beam_requests_batched_together_equal_solo_runs(checkpoints, variant):
    engine = Blip2Engine.from_pretrained(str(checkpoints(variant)[0]))
    side = engine.image_processor.height
    pixels = list(torch.randn(5, 3, side, side, generator=torch.Generator().manual_seed(8)))
    params = [
        SamplingParams(max_new_tokens=9, num_beams=3),
        SamplingParams(max_new_tokens=7, num_beams=2, n=2),
        SamplingParams(max_new_tokens=9, num_beams=3, length_penalty=0.5),
        SamplingParams(max_new_tokens=8, num_beams=3, logprobs=1),  # per-request path
        SamplingParams(max_new_tokens=8, num_beams=2, min_new_tokens=4),  # per-request, then batched
    ]
    together = engine.generate(pixels, None, params)
    for i, (image, p) in enumerate(zip(pixels, params, strict=True)):
        alone = engine.generate([image], None, p)[0]
        assert [c.token_ids for c in together[i].outputs] == [c.token_ids for c in alone.outputs], i


def _tokens(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in r.outputs] for r in results]


@pytest.mark.parametrize("variant", ["pre_ln", "t5"])
def test_min_new_tokens_blocks_eos_in_the_batched_paths_as_the_processors_do(checkpoints, variant):
    """Greedy, sampled and beam rows with min_new_tokens, through the batched paths and through the
    per-request path (which logprobs select): the same tokens. The stop token is set to one these images
    produce early, so the floor has something to hold back."""
    engine = Blip2Engine.from_pretrained(str(checkpoints(variant)[0]))
    side = engine.image_processor.height
    pixels = list(torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(9)))
    for kind in ({}, {"do_sample": True, "seed": 3, "top_k": 0}, {"num_beams": 3, "n": 2}):
        engine.eos_ids = (-1,)
        second = _tokens(engine.generate(pixels, None, SamplingParams(max_new_tokens=8, **kind)))[0][0][1]
        engine.eos_ids = (second,)  # a token the first image produces second
        free = _tokens(engine.generate(pixels, None, SamplingParams(max_new_tokens=8, **kind)))
        assert min(len(t) for r in free for t in r) <= 2, kind  # the stop token does stop something
        batched = SamplingParams(max_new_tokens=8, min_new_tokens=4, **kind)
        per_request = SamplingParams(max_new_tokens=8, min_new_tokens=4, logprobs=0, **kind)
        got = _tokens(engine.generate(pixels, None, batched))
        assert got == _tokens(engine.generate(pixels, None, per_request)), kind
        assert all(len(t) >= 4 for r in got for t in r), kind
