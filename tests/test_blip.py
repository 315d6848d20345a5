"""BLIP (v1) captioning and VQA against transformers, token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels
from oracle import hf_continuation
from oracle_blip import IMAGE_SIZE, hf_blip_generate, hf_tokenizer

from model import Blip2Engine, SamplingParams

PREFIXES = [None, "a photo of", "two dogs playing in the"]
QUESTIONS = ["what is in the picture?", "how many dogs are there?", "where is the man?"]


@pytest.fixture(scope="module")
def captioner(checkpoints):
    root, hf = checkpoints("blip_caption")
    return Blip2Engine.from_pretrained(str(root)), hf, root


@pytest.fixture(scope="module")
def answerer(checkpoints):
    root, hf = checkpoints("blip_vqa")
    return Blip2Engine.from_pretrained(str(root)), hf, root


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return random_pixels(n, size=IMAGE_SIZE, seed=seed)


def test_tokenization_matches_transformers(captioner, answerer):
    engine, _, root = captioner
    tok = hf_tokenizer(root)
    for prefix in PREFIXES[1:]:
        ref = tok(prefix).input_ids
        assert engine.text_ids(prefix) == [engine.cfg.text.bos_token_id, *ref[1:-1]]
    vqa, _, vqa_root = answerer
    for q in QUESTIONS:
        assert vqa.text_ids(q) == hf_tokenizer(vqa_root)(q).input_ids
    assert engine.tokenizer.decode(tok("a photo of a cat").input_ids) == "a photo of a cat"


def test_image_features_match(captioner):
    engine, hf, _ = captioner
    pv = pixels(2)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pv).last_hidden_state
    torch.testing.assert_close(engine.model.encode_images(pv), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_captions_match_transformers(captioner, prefix, num_beams):
    engine, hf, root = captioner
    pv = pixels(3, seed=1)
    params = SamplingParams(max_new_tokens=10, num_beams=num_beams)
    ours = engine.generate(list(pv), [prefix] * 3, params)
    ids = hf_tokenizer(root)(prefix).input_ids if prefix else None
    for image, result in zip(pv, ours, strict=True):
        ref = hf_blip_generate(hf, image, ids, max_new_tokens=10, num_beams=num_beams)
        assert result.token_ids == ref, (prefix, num_beams)
        # The caption continues the prefix: a first `##` piece joins its last word.
        assert result.text == hf_continuation(
            hf_tokenizer(root), engine.prompt_ids(engine.text_ids(prefix)), ref
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_match_transformers(answerer, num_beams):
    engine, hf, root = answerer
    pv = pixels(3, seed=2)
    params = SamplingParams(max_new_tokens=8, num_beams=num_beams)
    ours = engine.generate(list(pv), QUESTIONS, params)
    tok = hf_tokenizer(root)
    for image, q, result in zip(pv, QUESTIONS, ours, strict=True):
        ref = hf_blip_generate(hf, image, tok(q).input_ids, max_new_tokens=8, num_beams=num_beams)
        assert result.token_ids == ref, (q, num_beams)


def test_vqa_model_needs_a_question(answerer):
    engine, _, _ = answerer
    with pytest.raises(ValueError, match="question"):
        engine.generate(list(pixels(1)), [None])
