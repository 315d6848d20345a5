"""/match and /embed over HTTP on retrieval checkpoints, against transformers and solo runs."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from live import b64, png_bytes, serve_in_thread
from oracle_blip import BLIP2_IMAGE_SIZE, IMAGE_SIZE, hf_tokenizer
from PIL import Image
from test_retrieval import hf_scores

from server.settings import Settings


def flat(scores: list[dict]) -> list[float]:
    return [v for s in scores for v in (s["text"], s["itm"], s["itc"])]


TEXTS = ["a photo of a cat", "two dogs playing in the snow", "a red bus"]
SIZES = {"blip2_itm": BLIP2_IMAGE_SIZE, "blip_itm": IMAGE_SIZE}


@pytest.fixture(scope="module", params=["blip2_itm", "blip_itm"])
def server(request, checkpoints):
    root, hf = checkpoints(request.param)
    engine = "process" if request.param == "blip2_itm" else "thread"  # one engine process is enough
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_wait_ms=20, engine=engine)
    with serve_in_thread(settings) as url:
        yield request.param, url, root, hf


def hf_pixels(data: bytes, size: int) -> torch.Tensor:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out = BlipImageProcessorPil(size={"height": size, "width": size})(
        Image.open(io.BytesIO(data)), return_tensors="np"
    )
    return torch.from_numpy(np.asarray(out["pixel_values"]))[0]


def test_match_equals_transformers(server):
    variant, url, root, hf = server
    data = png_bytes(3)
    r = httpx.post(url + "/match", json={"image": b64(data), "texts": TEXTS})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    tok = hf_tokenizer(root)
    for i, text in enumerate(TEXTS):
        itm, itc, _, _ = hf_scores(variant, hf, hf_pixels(data, SIZES[variant]), tok(text).input_ids)
        assert scores[i]["text"] == i
        assert scores[i]["itm"] == pytest.approx(itm, abs=1e-5)
        assert scores[i]["itc"] == pytest.approx(itc, abs=1e-5)


def test_concurrent_match_and_embed_equal_solo(server):
    _, url, _, _ = server
    blobs = [png_bytes(seed) for seed in range(4)]
    solo_match = [httpx.post(url + "/match", json={"image": b64(b), "texts": TEXTS}).json() for b in blobs]
    solo_embed = httpx.post(url + "/embed", json={"images": [b64(b) for b in blobs], "texts": TEXTS}).json()

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            matches = [client.post("/match", json={"image": b64(b), "texts": TEXTS}) for b in blobs]
            embeds = [client.post("/embed", json={"image": b64(b)}) for b in blobs]
            text = client.post("/embed", json={"texts": TEXTS})
            return await asyncio.gather(*matches, *embeds, text)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    for solo, r in zip(solo_match, responses[:4], strict=True):
        assert flat(r.json()["scores"]) == pytest.approx(flat(solo["scores"]), abs=1e-6)
    for i, r in enumerate(responses[4:8]):
        got = np.array(r.json()["image_embeddings"][0])
        np.testing.assert_allclose(got, np.array(solo_embed["image_embeddings"][i]), atol=1e-5)
        assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    text = responses[8].json()
    np.testing.assert_allclose(text["text_embeddings"], solo_embed["text_embeddings"], atol=1e-5)
    assert text["image_embeddings"] == [] and text["dimensions"] == len(text["text_embeddings"][0])


def test_itc_score_is_the_dot_product_of_the_embeddings(server):
    _, url, _, _ = server
    data = png_bytes(9)
    score = httpx.post(url + "/match", json={"image": b64(data), "texts": TEXTS}).json()["scores"]
    emb = httpx.post(url + "/embed", json={"image": b64(data), "texts": TEXTS}).json()
    sims = (np.array(emb["image_embeddings"][0]) @ np.array(emb["text_embeddings"]).T).max(axis=0)
    np.testing.assert_allclose([s["itc"] for s in score], sims, atol=1e-5)


def test_bad_retrieval_requests_get_4xx(server):
    _, url, _, _ = server
    img = b64(png_bytes(1))
    cases = [
        ("/match", {"image": img, "texts": []}, 422),
        ("/match", {"texts": ["a cat"]}, 422),
        ("/match", {"image": img, "texts": [""]}, 422),
        ("/embed", {}, 422),
        ("/embed", {"image": img, "images": [img]}, 422),
        ("/embed", {"image": "not base64!", "texts": ["x"]}, 400),
        ("/caption", {"image": img}, 400),
        ("/vqa", {"image": img, "question": "what?"}, 400),
    ]
    for path, body, status in cases:
        r = httpx.post(url + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert httpx.post(url + "/match", json={"image": img, "texts": ["a cat"]}).status_code == 200


def test_an_overlong_text_names_its_field(server):
    """/match and /embed name a text past the model's 64 positions by their own field, `texts[i]`."""
    _, url, _, _ = server
    img, long = b64(png_bytes(1)), "cat " * 63  # 65 tokens with [CLS] and [SEP]
    for path, body in (("/match", {"image": img}), ("/embed", {"images": [img]}), ("/embed", {})):
        r = httpx.post(url + path, json={**body, "texts": ["a cat", long]})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["message"] == "texts[1]: 65 tokens, more than the model's 64", path


def test_multipart_match(server):
    _, url, _, _ = server
    data = png_bytes(5)
    files = {"image": ("x.png", data, "image/png")}
    r = httpx.post(url + "/match", files=files, data={"texts": TEXTS[:2]})
    assert r.status_code == 200, r.text
    ref = httpx.post(url + "/match", json={"image": b64(data), "texts": TEXTS[:2]}).json()["scores"]
    assert flat(r.json()["scores"]) == pytest.approx(flat(ref), abs=1e-6)


def test_multipart_embed_of_texts_alone(server):
    """/embed takes texts without an image in a form too (as its schema says), as in JSON."""
    _, url, _, _ = server
    r = httpx.post(url + "/embed", files=[("texts", (None, t)) for t in TEXTS])  # form fields, no file
    assert r.status_code == 200, r.text
    ref = httpx.post(url + "/embed", json={"texts": TEXTS}).json()
    assert r.json()["image_embeddings"] == [] and len(r.json()["text_embeddings"]) == len(TEXTS)
    assert r.json()["text_embeddings"] == ref["text_embeddings"]
    r = httpx.post(url + "/match", files=[("texts", (None, t)) for t in TEXTS])
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(
        "image: a file part named 'image'"
    )
