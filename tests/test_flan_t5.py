"""BLIP-2 Flan-T5 (encoder-decoder language model) against transformers, token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels
from oracle import hf_generate

from model import Blip2Engine, SamplingParams

PROMPTS = [None, "Question: what is in the picture? Answer:"]


@pytest.fixture(scope="module")
def pair(checkpoints):
    root, hf = checkpoints("t5")
    return Blip2Engine.from_pretrained(str(root)), hf


def hf_tokens(engine, hf, pixels: torch.Tensor, prompt: str | None, **kwargs) -> list[int]:
    ids = engine.cfg.num_query_tokens * [engine.cfg.image_token_index] + engine.text_ids(prompt)
    return hf_generate(hf, pixels, ids, **kwargs)


def test_config_and_encoder_match(pair):
    engine, hf = pair
    assert engine.cfg.is_encoder_decoder and engine.prompt_ids(engine.text_ids(None)) == [0]
    pixels = random_pixels(1)[0]
    model = engine.model
    text_ids = engine.text_ids(PROMPTS[1])
    embeds = model.prompt_embeddings(model.encode_images(pixels[None])[0], text_ids)
    ids = torch.tensor([engine.cfg.num_query_tokens * [engine.cfg.image_token_index] + text_ids])
    with torch.no_grad():
        queries = hf.get_image_features(pixels[None]).pooler_output
        ref_in = hf.get_input_embeddings()(ids)
        ref_in[0, : engine.cfg.num_query_tokens] = queries[0]
        ref = hf.language_model.encoder(inputs_embeds=ref_in).last_hidden_state[0]
        ours = model.language_model.encode(embeds[None], torch.tensor([embeds.shape[0]]))[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# Beams with no prompt (the captioning preset's 5 beams) once diverged: transformers 5 scales T5's
# decoder output by `scale_decoder_outputs`, not by `tie_word_embeddings`; beam scores see the scale.
@pytest.mark.parametrize(
    "prompt, num_beams", [(None, 1), (None, 3), (None, 5), (PROMPTS[1], 1), (PROMPTS[1], 3)]
)
def test_generate_matches_transformers(pair, prompt, num_beams):
    engine, hf = pair
    pixels = random_pixels(2, seed=4)
    params = SamplingParams(max_new_tokens=12, num_beams=num_beams)
    ours = engine.generate(list(pixels), [prompt, prompt], params)
    for pv, result in zip(pixels, ours, strict=True):
        ref = hf_tokens(engine, hf, pv, prompt, max_new_tokens=12, num_beams=num_beams)
        assert result.token_ids == ref[: len(result.token_ids)] and all(
            t == 1 for t in ref[len(result.token_ids) :]
        )
        assert len(result.token_ids) >= 1


def test_mixed_batch_equals_solo_runs(pair):
    """Continuous batching for encoder-decoder: different prompt lengths, greedy and beams, in one batch."""
    engine, _ = pair
    pixels = list(random_pixels(3, seed=8))
    prompts = [None, PROMPTS[1], "a photo of"]
    plist = [
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=7, num_beams=2),
        SamplingParams(max_new_tokens=10, repetition_penalty=1.3),
    ]
    together = engine.generate(pixels, prompts, plist)
    for pv, pr, pa, result in zip(pixels, prompts, plist, together, strict=True):
        assert result.token_ids == engine.generate([pv], [pr], pa)[0].token_ids
