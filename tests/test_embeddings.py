"""`POST /v1/embeddings` (OpenAI's shape) on the retrieval checkpoints, driven by the official `openai`
client: its values are /embed's, in float and base64; errors in OpenAI's shape."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from live import b64, png_bytes, serve_in_thread
from oracle_blip import hf_tokenizer

from server.settings import Settings

TEXTS = ["a photo of a cat", "two dogs playing in the snow", "a red bus"]


@pytest.fixture(scope="module", params=["blip2_itm", "blip_itm"])
def live(request, checkpoints):
    root, _ = checkpoints(request.param)
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_wait_ms=0, engine="thread")
    with serve_in_thread(settings) as url:
        yield request.param, url, str(root)


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def native(live, **body) -> dict:
    r = httpx.post(live[1] + "/embed", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def vectors_of(response, encoding_format: str | None) -> np.ndarray:
    """The client decodes base64 itself only when it chose it (no encoding_format given)."""
    if encoding_format == "base64":
        return np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    return np.array([d.embedding for d in response.data])


def width(live) -> int:
    return json.loads((Path(live[2]) / "config.json").read_text())["image_text_hidden_size"]


def normalised_mean(vectors: list[list[float]]) -> np.ndarray:
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_text_embeddings_equal_embed(client, live, encoding_format):
    _, _, model = live
    options = {"encoding_format": encoding_format} if encoding_format else {}
    got = client.embeddings.create(model=model, input=TEXTS, **options)
    want = native(live, texts=TEXTS)["text_embeddings"]
    assert [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(vectors_of(got, encoding_format), want, atol=1e-6)
    assert got.model == model and got.object == "list"
    tok = hf_tokenizer(live[2])
    tokens = sum(len(tok(t).input_ids) for t in TEXTS)
    assert got.usage.prompt_tokens == tokens and got.usage.total_tokens == tokens


def test_base64_is_little_endian_float32_of_the_float_values(live):
    _, url, model = live
    body = {"model": model, "input": "a photo of a cat"}
    floats = httpx.post(url + "/v1/embeddings", json=body).json()["data"][0]["embedding"]
    raw = httpx.post(url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == floats  # the float values are float32 values: bit for bit
    assert len(floats) == width(live)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_image_and_text_parts_in_one_list(client, live, encoding_format):
    variant, _, model = live
    images = [png_bytes(3), png_bytes(4)]
    mixed = [image_part(images[0]), TEXTS[0], {"type": "text", "text": TEXTS[1]}, image_part(images[1])]
    options = {"encoding_format": encoding_format} if encoding_format else {}
    got = client.embeddings.create(model=model, input=mixed, **options)
    vectors = vectors_of(got, encoding_format)
    ref = native(live, images=[b64(d) for d in images], texts=TEXTS[:2])
    per_query = ref["image_embeddings"]
    assert (len(per_query[0]) > 1) == (variant == "blip2_itm")  # BLIP-2: one per query token
    np.testing.assert_allclose(vectors[0], normalised_mean(per_query[0]), atol=1e-6)
    np.testing.assert_allclose(vectors[3], normalised_mean(per_query[1]), atol=1e-6)
    np.testing.assert_allclose(vectors[1:3], ref["text_embeddings"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    if variant == "blip_itm":  # one embedding per image: the cosine is /match's ITC score itself
        r = httpx.post(live[1] + "/match", json={"image": b64(images[0]), "texts": TEXTS[:2]}).json()
        np.testing.assert_allclose(vectors[0] @ vectors[1:3].T, [s["itc"] for s in r["scores"]], atol=1e-5)
    tok = hf_tokenizer(live[2])
    assert got.usage.prompt_tokens == sum(len(tok(t).input_ids) for t in TEXTS[:2])


def test_dimensions(client, live):
    _, _, model = live
    n = width(live)
    got = client.embeddings.create(model=model, input="a cat", dimensions=n, encoding_format="float")
    assert len(got.data[0].embedding) == n
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=model, input="a cat", dimensions=n // 2)
    assert err.value.body["param"] == "dimensions" and str(n) in err.value.body["message"]


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_bad_requests_get_openai_errors(live):
    """Each mistake is a 400 (404 for the model) in OpenAI's shape, whose message names the item as sent
    and whose `param` is the field."""
    _, url, model = live
    png = "data:image/png;base64,"
    cases = [
        ({"model": "gpt-4", "input": "x"}, 404, "model", "gpt-4"),
        ({"model": model, "input": []}, 400, "input", "input: must not be empty"),
        ({"model": model, "input": ["ok", ""]}, 400, "input", "input[1]"),
        ({"model": model, "input": ["fine", 7]}, 400, "input", "input[1]: token ids"),
        ({"model": model, "input": [[1, 2, 3]]}, 400, "input", "input[0]: token ids"),
        ({"model": model, "input": ["a", True]}, 400, "input", "input[1]: expected a string"),
        ({"model": model, "input": None}, 400, "input", "input: expected a string or a list"),
        ({"model": model, "input": 1.5}, 400, "input", "input: expected a string or a list"),
        ({"model": model, "input": [{"type": "audio", "audio": "x"}]}, 400, "input", "input[0].type"),
        ({"model": model, "input": [{"type": "image_url"}]}, 400, "input", "input[0].image_url"),
        ({"model": model, "input": ["a", image_url("data:,abc")]}, 400, "input", "input[1]: data URL"),
        (
            {"model": model, "input": ["a", image_url(png + "abc!")]},
            400,
            "input",
            "input[1]: not valid base64",
        ),
        ({"model": model, "input": ["a", image_url(png + "AAAA")]}, 400, "input", "input[1]: not an image"),
        (
            {"model": model, "input": [image_url("http://127.0.0.1:9/a.png")]},
            400,
            "input",
            "input[0]: image URLs",
        ),
        ({"model": model, "input": [image_url(png + "AAAA")] * 17}, 400, "input", "at most 16 images"),
        (
            {"model": model, "input": "x", "encoding_format": "int8"},
            400,
            "encoding_format",
            "'float' or 'base64'",
        ),
        ({"model": model, "input": "x", "bogus": 1}, 400, "bogus", "bogus: unknown field"),
    ]
    for body, status, param, message in cases:
        r = httpx.post(url + "/v1/embeddings", json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        assert message in error["message"], (body, error)
    assert httpx.post(url + "/v1/embeddings", json={"model": model, "input": "fine"}).status_code == 200


def test_an_overlong_text_is_named_as_the_request_names_it(live):
    """A text past the model's 64 positions (the tiny checkpoints') is named by its place in `input`
    (`input` for one string; `input[i]` in a list, counting the images before it), not the engine's
    `texts[j]`."""
    _, url, model = live
    long = "cat " * 63  # 63 words + [CLS] + [SEP]: 65 tokens
    picture = image_url("data:image/png;base64," + b64(png_bytes(1)))
    for given, name in (
        (long, "input"),
        (["a", picture, long], "input[2]"),
        ([picture, "b", long], "input[2]"),
    ):
        r = httpx.post(url + "/v1/embeddings", json={"model": model, "input": given})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input"
        assert error["message"] == f"{name}: 65 tokens, more than the model's 64", error


def test_generative_model_is_unsupported_task(checkpoints):
    root, _ = checkpoints("pre_ln")
    settings = Settings(model=str(root), device="cpu", dtype="float32", engine="thread")
    with (
        serve_in_thread(settings) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as err,
    ):
        client.embeddings.create(model=str(root), input="a cat")
    assert err.value.body["code"] == "unsupported_task"
    assert err.value.body["type"] == "invalid_request_error"


def test_the_readme_embeddings_snippet_runs(client, live):
    """The README's `client.embeddings.create` block, as written, with its `client`, `model` and `url`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = [b for b in readme.split("```python\n")[1:] if "client.embeddings.create(" in b.split("```")[0]]
    url = "data:image/png;base64," + b64(png_bytes(3))
    scope = {"client": client, "model": live[2], "url": url}
    exec(code.split("```")[0], scope)
    text_vec, image_vec = np.array(scope["text_vec"]), np.array(scope["image_vec"])
    ref = native(live, image=b64(png_bytes(3)), texts=["a photo of a cat"])
    np.testing.assert_allclose(text_vec, ref["text_embeddings"][0], atol=1e-6)
    np.testing.assert_allclose(image_vec, normalised_mean(ref["image_embeddings"][0]), atol=1e-6)
