"""Our engine against transformers' Blip2ForConditionalGeneration, token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels
from oracle import VARIANTS, hf_generate

from model import Blip2Engine, SamplingParams
from model.arch.kv_cache import AttnBatch

PROMPTS = [None, "Question: what is in the picture? Answer:", "a photo of"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, checkpoints):
    root, hf = checkpoints(request.param)
    return Blip2Engine.from_pretrained(str(root)), hf


def test_image_stage_matches(pair):
    engine, hf = pair
    pixels = random_pixels(3)
    with torch.no_grad():
        ref_vision = hf.vision_model(pixels).last_hidden_state
        ref = hf.get_image_features(pixels).pooler_output
    torch.testing.assert_close(engine.model.vision_model(pixels), ref_vision, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.model.encode_images(pixels), ref, atol=1e-5, rtol=1e-5)


def test_qformer_matches(pair):
    engine, hf = pair
    image = torch.randn(2, 17, 32)
    queries = hf.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        ref = hf.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(engine.model.qformer(queries, image), ref, atol=1e-5, rtol=1e-5)


def test_prefill_and_decode_logits_match(pair):
    engine, hf = pair
    pixels = random_pixels(1)[0]
    prompt_ids = engine.prompt_ids(engine.text_ids("Question: what color is the bus? Answer:"))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ref = hf(pixel_values=pixels[None], input_ids=ids).logits[0]
    model = engine.model
    cache = model.language_model.new_cache(1, len(prompt_ids) + 4, torch.float32, "cpu")
    queries, text = model.encode_images(pixels[None])[0], prompt_ids[model.cfg.num_query_tokens :]
    embeds = model.prompt_embeddings(queries, text)
    n = len(prompt_ids)
    slots = torch.tensor([0])
    # Prefill all but the last 3 tokens, then decode those one at a time: every logit must match.
    logits = model.prefill([model.prompt_inputs(queries, text[:-3])], slots, cache)
    torch.testing.assert_close(logits[0], ref[n - 4], atol=1e-4, rtol=1e-4)
    for pos in range(n - 3, n):
        logits = model.decode(torch.tensor([prompt_ids[pos]]), torch.tensor([pos]), slots, cache, pos + 1)
        torch.testing.assert_close(logits[0], ref[pos], atol=1e-4, rtol=1e-4)
    hidden = model.language_model(embeds[None], AttnBatch.prefill(slots, n), cache)
    torch.testing.assert_close(model.language_model.logits(hidden)[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_matches_transformers(pair, prompt, num_beams):
    engine, hf = pair
    pixels = random_pixels(2, seed=7)
    params = SamplingParams(max_new_tokens=14, num_beams=num_beams)
    ours = engine.generate(list(pixels), [prompt, prompt], params)
    for pv, result in zip(pixels, ours, strict=True):
        full = engine.prompt_ids(engine.text_ids(prompt)) if prompt else None
        ref = hf_generate(hf, pv, full, max_new_tokens=14, num_beams=num_beams)
        assert result.token_ids == ref
        assert result.completion_tokens == len(ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetition_penalty": 1.5},
        {"min_new_tokens": 5, "max_new_tokens": 8},
        {"num_beams": 3, "length_penalty": 2.0, "repetition_penalty": 1.3},
        {"num_beams": 5, "length_penalty": -1.0, "max_new_tokens": 6},
    ],
)
def test_processors_match_transformers(pair, kwargs):
    engine, hf = pair
    pv = random_pixels(1, seed=3)[0]
    prompt = "Question: where is the man? Answer:"
    params = SamplingParams(**{"max_new_tokens": 12, **kwargs})
    ours = engine.generate([pv], [prompt], params)[0].token_ids
    ref_kwargs = {"max_new_tokens": 12, **kwargs}
    assert ours == hf_generate(hf, pv, engine.prompt_ids(engine.text_ids(prompt)), **ref_kwargs)


def test_batched_mixed_requests_equal_solo(checkpoints):
    """Different prompt lengths, beams and greedy in one batch: each equals its solo run and the oracle."""
    root, hf = checkpoints("pre_ln")
    engine = Blip2Engine.from_pretrained(str(root))
    pixels = list(random_pixels(5, seed=11))
    prompts = [None, "a photo of", "Question: how many dogs are there? Answer:", None, "two dogs"]
    params = [
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=6, num_beams=3),
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=9, num_beams=2),
        SamplingParams(max_new_tokens=3),
    ]
    batched = engine.generate(pixels, prompts, params)
    for pv, pr, pa, got in zip(pixels, prompts, params, batched, strict=True):
        solo = engine.generate([pv], [pr], pa)[0]
        assert got.token_ids == solo.token_ids
        full = engine.prompt_ids(engine.text_ids(pr)) if pr else None
        assert got.token_ids == hf_generate(
            hf, pv, full, max_new_tokens=pa.max_new_tokens, num_beams=pa.num_beams
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stops_on_eos_like_transformers(checkpoints, num_beams):
    """Make a token the model really emits the stop token, so both stop early on it."""
    root, hf = checkpoints("pre_ln")
    engine = Blip2Engine.from_pretrained(str(root))
    pixels = random_pixels(3, seed=5)
    params = SamplingParams(max_new_tokens=12, num_beams=num_beams)
    free = engine.generate(list(pixels), None, params)
    stop = free[0].token_ids[4]
    engine.eos_ids = (stop,)
    got = engine.generate(list(pixels), None, params)
    stopped = [r for r in got if r.finish_reason == "stop"]
    assert stopped and all(r.token_ids[-1] == stop and len(r.token_ids) < 12 for r in stopped)
    for pv, result in zip(pixels, got, strict=True):
        ref = hf_generate(hf, pv, None, max_new_tokens=12, num_beams=num_beams, eos_token_id=stop)
        assert result.token_ids == ref
