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
