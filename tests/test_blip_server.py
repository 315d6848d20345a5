"""BLIP (v1) checkpoints served over HTTP: the same endpoints, picked by config.json, against transformers."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from live import b64, png_bytes, serve_in_thread
from oracle_blip import IMAGE_SIZE, hf_blip_generate, hf_tokenizer
from PIL import Image

from server.settings import Settings


def hf_pixels(data: bytes) -> torch.Tensor:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    out = processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.asarray(out))[0]


def serve(root, engine: str = "process"):
    settings = Settings(
        model=str(root), device="cpu", dtype="float32", max_wait_ms=20, max_running_seqs=16, engine=engine
    )
    return serve_in_thread(settings)


@pytest.fixture(scope="module")
def caption_server(checkpoints):
    root, hf = checkpoints("blip_caption")
    with serve(root) as url:
        yield url, root, hf


@pytest.fixture(scope="module")
def vqa_server(checkpoints):
    root, hf = checkpoints("blip_vqa")
    with serve(root, "thread") as url:  # the captions' server has the engine process; this one in-process
        yield url, root, hf


def test_captions_over_http_match_transformers_also_when_concurrent(caption_server):
    url, root, hf = caption_server
    tok = hf_tokenizer(root)
    jobs = [
        (png_bytes(seed), prefix, beams)
        for seed in range(4)
        for prefix in (None, "a photo of")
        for beams in (1, 3)
    ]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            bodies = [
                {"image": b64(data), "prompt": prefix, "num_beams": beams, "max_new_tokens": 8}
                for data, prefix, beams in jobs
            ]
            return await asyncio.gather(*(client.post("/caption", json=b) for b in bodies))

    for (data, prefix, beams), r in zip(jobs, asyncio.run(burst()), strict=True):
        assert r.status_code == 200, r.text
        ids = tok(prefix).input_ids if prefix else None
        ref = hf_blip_generate(hf, hf_pixels(data), ids, max_new_tokens=8, num_beams=beams)
        assert r.json()["caption"] == tok.decode(ref, skip_special_tokens=True).strip()


def test_captioner_refuses_questions_and_keeps_serving(caption_server):
    url, _, _ = caption_server
    r = httpx.post(url + "/vqa", json={"image": b64(png_bytes(1)), "question": "what is it?"})
    assert r.status_code == 400 and "does not serve 'vqa'" in r.json()["error"]["message"]
    models = httpx.get(url + "/v1/models").json()["data"][0]
    assert models["tasks"] == ["caption"] and models["vqa_template"] is None
    r = httpx.post(url + "/match", json={"image": b64(png_bytes(1)), "texts": ["a cat"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
    assert httpx.post(url + "/caption", json={"image": b64(png_bytes(1))}).status_code == 200


def test_answers_over_http_match_transformers(vqa_server):
    url, root, hf = vqa_server
    tok = hf_tokenizer(root)
    data = png_bytes(7)
    questions = ["what is in the picture?", "how many dogs are there?"]
    r = httpx.post(url + "/vqa", json={"image": b64(data), "questions": questions, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    answers = [item["text"] for item in r.json()["answers"]]
    for q, answer in zip(questions, answers, strict=True):
        ref = hf_blip_generate(hf, hf_pixels(data), tok(q).input_ids, max_new_tokens=6)
        assert answer == tok.decode(ref, skip_special_tokens=True).strip()
    assert httpx.get(url + "/v1/models").json()["data"][0]["vqa_template"] == "{question}"


def test_vqa_model_refuses_captions(vqa_server):
    url, _, _ = vqa_server
    r = httpx.post(url + "/caption", json={"image": b64(png_bytes(1))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
    chat = {
        "model": "x",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
    }
    assert httpx.post(url + "/v1/chat/completions", json=chat).status_code in (400, 404)
