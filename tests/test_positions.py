"""The position limit: a prompt and max_new_tokens fit when prompt + max_new_tokens - 1 positions fit,
since the last new token is never fed back (transformers generates every token of such a request)."""

from __future__ import annotations

import io

import httpx
import pytest
from conftest import random_pixels
from live import b64, png_bytes, serve_in_thread
from oracle import hf_generate
from oracle_blip import IMAGE_SIZE, hf_blip_generate, hf_tokenizer
from PIL import Image

from model import Blip2Engine, SamplingParams
from server.settings import Settings

# Long enough to leave a short answer (a fast test) before OPT's 128 positions.
PROMPT = "a photo of a cat sitting on a couch " * 7 + "and"


@pytest.fixture(scope="module")
def opt(checkpoints):
    root, hf = checkpoints("pre_ln")
    return Blip2Engine.from_pretrained(str(root)), hf, root


def boundary(engine: Blip2Engine, prompt: str) -> int:
    """The largest max_new_tokens for `prompt`: prompt positions + max_new_tokens - 1 == the model's."""
    prompt_ids = engine.prompt_ids(engine.text_ids(prompt))
    return engine.max_positions - len(prompt_ids) + 1


def test_opt_at_the_limit_generates_what_transformers_does(opt):
    engine, hf, _ = opt
    limit = boundary(engine, PROMPT)
    assert engine.max_positions == hf.config.text_config.max_position_embeddings
    pv = random_pixels(1, seed=4)[0]
    # min_new_tokens = max_new_tokens: every position is used, up to the last one.
    params = SamplingParams(max_new_tokens=limit, min_new_tokens=limit)
    ours = engine.generate([pv], [PROMPT], params)[0]
    ref = hf_generate(
        hf, pv, engine.prompt_ids(engine.text_ids(PROMPT)), max_new_tokens=limit, min_new_tokens=limit
    )
    assert len(ref) == limit and ours.token_ids == ref
    with pytest.raises(ValueError, match="positions"):
        engine.request(pv, "k", PROMPT, SamplingParams(max_new_tokens=limit + 1))


def test_blip_at_the_limit_generates_what_transformers_does(checkpoints):
    root, hf = checkpoints("blip_caption")
    engine = Blip2Engine.from_pretrained(str(root))
    prefix = "two dogs playing in the snow on a sunny day " * 4 + "with"
    limit = boundary(engine, prefix)
    pv = random_pixels(1, size=IMAGE_SIZE, seed=5)[0]
    params = SamplingParams(max_new_tokens=limit, min_new_tokens=limit)
    ours = engine.generate([pv], [prefix], params)[0]
    ids = hf_tokenizer(root)(prefix).input_ids
    ref = hf_blip_generate(hf, pv, ids, max_new_tokens=limit, min_new_tokens=limit)
    assert len(ref) == limit and ours.token_ids == ref
    with pytest.raises(ValueError, match="positions"):
        engine.request(pv, "k", prefix, SamplingParams(max_new_tokens=limit + 1))


def test_http_accepts_the_limit_and_refuses_one_past_it(opt):
    engine, hf, root = opt
    limit = boundary(engine, PROMPT)
    data = png_bytes(2)
    pixels = engine.image_processor.preprocess(Image.open(io.BytesIO(data)))
    ref = hf_generate(
        hf, pixels, engine.prompt_ids(engine.text_ids(PROMPT)), max_new_tokens=limit, min_new_tokens=limit
    )
    settings = Settings(
        model=str(root), device="cpu", engine="thread", max_wait_ms=0, max_new_tokens_limit=limit + 1
    )
    with serve_in_thread(settings) as url:
        body = {"image": b64(data), "prompt": PROMPT, "min_new_tokens": limit, "logprobs": 0}
        r = httpx.post(url + "/caption", json={**body, "max_new_tokens": limit}, timeout=60)
        assert r.status_code == 200, r.text
        assert [t["id"] for t in r.json()["choices"][0]["logprobs"]] == ref
        r = httpx.post(url + "/caption", json={**body, "max_new_tokens": limit + 1}, timeout=60)
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]
