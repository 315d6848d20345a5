"""`no_repeat_ngram_size` (transformers' `NoRepeatNGramLogitsProcessor`) against transformers: the
processor itself, then greedy and beam search token for token on BLIP-2 OPT (whose history holds the
prompt, image placeholders included) and BLIP; sampled rows; the HTTP field and its bounds."""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from conftest import random_pixels
from live import b64, png_bytes, serve_in_thread
from oracle import hf_continuation, hf_generate
from oracle_blip import IMAGE_SIZE, hf_blip_generate, hf_tokenizer
from PIL import Image

from model import Blip2Engine, SamplingParams
from model.decoding.generation import MAX_NO_REPEAT_NGRAM
from model.decoding.processors import history_processors
from server.settings import Settings

PROMPT = "Question: what is in the picture? Answer:"


def repeats(history: list[int], tokens: list[int], size: int) -> bool:
    """Whether a generated token completes an n-gram of `size` tokens seen before in history + tokens."""
    seq = history + tokens
    for end in range(len(history), len(seq)):
        gram = seq[end + 1 - size : end + 1]
        if len(gram) == size and any(seq[i : i + size] == gram for i in range(end + 1 - size)):
            return True
    return False


@pytest.fixture(scope="module")
def opt(checkpoints):
    root, hf = checkpoints("pre_ln")
    return Blip2Engine.from_pretrained(str(root)), hf, root


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_the_batched_history_processors_equal_transformers_row_by_row(size):
    """Rows of unequal history lengths (junk past each length), each with its own n-gram size and
    repetition penalty (some off), ids past the vocabulary among them: each row equals transformers'
    `RepetitionPenaltyLogitsProcessor` then `NoRepeatNGramLogitsProcessor` on that row alone."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(size)
    lengths = [1, size - 1 or 1, size, size + 1, 12, 40, 7, 3]
    sizes = [size, size, size, 2, size, size, 0, size]
    penalties = [1.3, 1.0, 0.7, 1.3, 1.5, 1.0, 1.3, 1.0]
    history = torch.randint(0, 6, (len(lengths), 44), generator=gen)  # a small alphabet: many repeats
    history[4, 3] = history[5, 0] = 11  # past the vocabulary of 9: never penalised nor banned
    scores = torch.randn(len(lengths), 9, generator=gen) * 2
    got = history_processors(scores, history, lengths, penalties, sizes)
    for r, (length, n, p) in enumerate(zip(lengths, sizes, penalties, strict=True)):
        ids, ref = history[r : r + 1, :length], scores[r : r + 1].clone()
        if p != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(p)(ids, ref)
        if n:
            ref = NoRepeatNGramLogitsProcessor(n)(ids, ref)
        assert torch.equal(got[r : r + 1], ref), (r, length, n, p)


@pytest.mark.parametrize("size, num_beams", [(1, 1), (2, 3), (3, 3)])
def test_opt_matches_transformers(opt, size, num_beams):
    engine, hf, _ = opt
    pixels = random_pixels(2, seed=8)
    prompts = [None, PROMPT]
    params = SamplingParams(max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=size)
    ours = engine.generate(list(pixels), prompts, params)
    free = engine.generate(list(pixels), prompts, SamplingParams(max_new_tokens=16, num_beams=num_beams))
    for pv, prompt, result in zip(pixels, prompts, ours, strict=True):
        ids = engine.prompt_ids(engine.text_ids(prompt)) if prompt else None
        ref = hf_generate(hf, pv, ids, max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=size)
        assert result.token_ids == ref, (prompt, size, num_beams)
        assert not repeats(engine.prompt_ids(engine.text_ids(prompt)), result.token_ids, size)
    assert [r.token_ids for r in free] != [r.token_ids for r in ours], "the ban changed nothing here"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_blip_matches_transformers(checkpoints, num_beams):
    root, hf = checkpoints("blip_caption")
    engine = Blip2Engine.from_pretrained(str(root))
    pixels = random_pixels(2, size=IMAGE_SIZE, seed=9)
    prefixes = [None, "a photo of"]
    params = SamplingParams(max_new_tokens=14, num_beams=num_beams, no_repeat_ngram_size=2)
    ours = engine.generate(list(pixels), prefixes, params)
    free = engine.generate(list(pixels), prefixes, SamplingParams(max_new_tokens=14, num_beams=num_beams))
    for pv, prefix, result in zip(pixels, prefixes, ours, strict=True):
        ids = hf_tokenizer(root)(prefix).input_ids if prefix else None
        ref = hf_blip_generate(hf, pv, ids, max_new_tokens=14, num_beams=num_beams, no_repeat_ngram_size=2)
        assert result.token_ids == ref, (prefix, num_beams)
    assert [r.token_ids for r in free] != [r.token_ids for r in ours], "the ban changed nothing here"


def test_sampled_rows_never_repeat_an_ngram_and_are_seeded(opt):
    engine, _, _ = opt
    pixels = list(random_pixels(2, seed=10))
    history = engine.prompt_ids(engine.text_ids(None))
    params = SamplingParams(
        do_sample=True, seed=3, n=2, max_new_tokens=12, no_repeat_ngram_size=1, temperature=1.5
    )
    first = engine.generate(pixels, None, params)
    again = engine.generate(pixels[1:2], None, params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first[1].outputs]
    for result in first:
        for out in result.outputs:
            assert not repeats(history, out.token_ids, 1)
    # Without the ban, the same draws repeat tokens: the ban is what keeps them apart.
    free = engine.generate(pixels, None, SamplingParams(**{**params.__dict__, "no_repeat_ngram_size": 0}))
    assert any(repeats(history, o.token_ids, 1) for r in free for o in r.outputs)


@pytest.mark.parametrize("bad", [-1, MAX_NO_REPEAT_NGRAM + 1])
def test_out_of_bounds_is_a_value_error(bad):
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingParams(no_repeat_ngram_size=bad)


def test_http_caption_and_vqa(opt):
    engine, hf, root = opt
    data = png_bytes(3)
    pixels = engine.image_processor.preprocess(Image.open(io.BytesIO(data)))
    settings = Settings(model=str(root), device="cpu", engine="thread", max_wait_ms=0)
    question = "what is in the picture?"
    vqa_ids = engine.prompt_ids(engine.text_ids(f"Question: {question} Answer:"))
    with serve_in_thread(settings) as url:
        body = {"image": b64(data), "max_new_tokens": 12, "no_repeat_ngram_size": 2, "logprobs": 0}
        r = httpx.post(url + "/caption", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ref = hf_generate(hf, pixels, None, max_new_tokens=12, no_repeat_ngram_size=2)
        assert [t["id"] for t in r.json()["choices"][0]["logprobs"]] == ref
        form = {"question": question, "max_new_tokens": "12", "no_repeat_ngram_size": "2", "num_beams": "2"}
        r = httpx.post(url + "/vqa", files={"image": ("x.png", data, "image/png")}, data=form, timeout=60)
        assert r.status_code == 200, r.text
        ref = hf_generate(hf, pixels, vqa_ids, max_new_tokens=12, num_beams=2, no_repeat_ngram_size=2)
        assert r.json()["answer"] == hf_continuation(hf_tokenizer(root), vqa_ids, ref)
        for bad in (-1, MAX_NO_REPEAT_NGRAM + 1, "two"):
            for route, extra in (("/caption", {}), ("/vqa", {"question": question})):
                r = httpx.post(url + route, json={"image": b64(data), "no_repeat_ngram_size": bad, **extra})
                assert r.status_code == 422 and "no_repeat_ngram_size" in r.json()["error"]["message"]
