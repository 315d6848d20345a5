"""Faults: out-of-memory splits the batch and retries; repeated failures show on /ready; API keys; CORS."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import random_pixels
from live import b64, png_bytes, serve_in_thread

from model import Blip2Engine, SamplingParams
from server.service import Service
from server.settings import Settings


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))


def _oom_above(fn, limit: int, seen: list[int]):
    def wrapped(x, *args, **kwargs):
        seen.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return fn(x, *args, **kwargs)

    return wrapped


def test_oom_splits_vision_prefill_and_decode_and_results_are_unchanged(engine, monkeypatch):
    pixels = list(random_pixels(6, seed=21))
    prompts = [None, "a photo of", None, "Question: what? Answer:", None, "two dogs"]
    params = SamplingParams(max_new_tokens=8)
    expected = [r.token_ids for r in engine.generate(pixels, prompts, params)]
    vision, decode = [], []
    model = engine.model
    monkeypatch.setattr(model, "encode_images", _oom_above(model.encode_images, 2, vision))
    monkeypatch.setattr(model, "decode", _oom_above(model.decode, 3, decode))
    requests = [
        engine.request(p, f"k{i}", pr, params) for i, (p, pr) in enumerate(zip(pixels, prompts, strict=True))
    ]
    runner_holder = {}
    original = engine.new_runner

    def spy(*a, **kw):
        runner_holder["r"] = original(*a, **kw)
        return runner_holder["r"]

    monkeypatch.setattr(engine, "new_runner", spy)
    # The runner kept from the call above holds the model's functions as they were: make a new one.
    monkeypatch.setattr(engine, "_offline_runner", None)
    got = [r.token_ids for r in engine.run_offline(requests)]
    assert got == expected
    assert vision == [6, 3, 1, 2, 3, 1, 2]  # tries: 6 fails, each 3 fails, its halves pass
    assert max(decode) == 6 and runner_holder["r"].oom_splits >= 3


def test_single_item_oom_fails_only_that_request_and_ready_reflects_repeated_failures(checkpoints):
    settings = Settings(model=str(checkpoints("pre_ln")[0]), device="cpu", max_wait_ms=0, engine="thread")
    svc = Service.build(settings)
    model = svc.engine.model
    real = model.encode_images
    broken = {"on": False}

    def flaky(x):
        if broken["on"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    model.encode_images = flaky
    with serve_in_thread(settings, svc) as url:
        body = {"max_new_tokens": 3}
        broken["on"] = True
        for i in range(3):
            r = httpx.post(url + "/caption", json={"image": b64(png_bytes(50 + i)), **body})
            assert r.status_code == 500 and r.json()["error"]["message"] == "the request failed in the engine"
            assert "Traceback" not in r.text
        assert httpx.get(url + "/ready").status_code == 503  # three failed steps in a row
        broken["on"] = False
        assert httpx.post(url + "/caption", json={"image": b64(png_bytes(60)), **body}).status_code == 200
        assert httpx.get(url + "/ready").status_code == 200


def test_api_key_is_required_where_configured(checkpoints):
    settings = Settings(
        model=str(checkpoints("pre_ln")[0]),
        device="cpu",
        api_key="s3cret",
        auth_metrics=True,
        engine="thread",
    )
    with serve_in_thread(settings) as url:
        body = {"image": b64(png_bytes(1)), "max_new_tokens": 2}
        r = httpx.post(url + "/caption", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "unauthorized"
        assert (
            httpx.post(url + "/caption", json=body, headers={"authorization": "Bearer wrong"}).status_code
            == 401
        )
        assert (
            httpx.post(url + "/caption", json=body, headers={"authorization": "Bearer s3cret"}).status_code
            == 200
        )
        assert httpx.post(url + "/caption", json=body, headers={"x-api-key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # open unless auth_health
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"x-api-key": "s3cret"}).status_code == 200


def test_cors_is_off_by_default_and_on_when_configured(checkpoints):
    from fastapi.testclient import TestClient

    from server.app import create_app

    origin = {"origin": "https://example.org"}
    off = TestClient(create_app(Settings())).get("/health", headers=origin)
    assert "access-control-allow-origin" not in off.headers
    on = TestClient(create_app(Settings(cors_origins=["https://example.org"]))).get("/health", headers=origin)
    assert on.headers["access-control-allow-origin"] == "https://example.org"
