"""/metrics counts every HTTP request by route template (the OpenAI route included, unknown paths under
one label), and the engine's time to first token and prompt tokens, per request, as usage reports them."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from live import b64, png_bytes, serve_in_thread
from test_server import metric_values

from server.settings import Settings

REQUESTS, LATENCY = "blipserve_requests_total", "blipserve_request_latency_seconds_count"
TTFT, PROMPT = "blipserve_time_to_first_token_seconds_count", "blipserve_prompt_tokens_total"


@pytest.fixture(scope="module")
def live(checkpoints):
    with serve_in_thread(Settings(model=str(checkpoints("pre_ln")[0]), device="cpu", engine="thread")) as url:
        yield url


def _count(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def settled(url: str, name: str, expected: float, timeout: float = 5.0) -> dict:
    """The metrics once `name` reaches `expected` (the engine counts a step just after it answers)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(url)
        if _count(values, name) >= expected or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_every_route_is_counted_by_its_template(live):
    before = metric_values(live)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(1)).decode()
    chat = {
        "model": httpx.get(live + "/v1/models").json()["data"][0]["id"],
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 3,
    }
    assert httpx.post(live + "/v1/chat/completions", json=chat).status_code == 200
    assert httpx.post(live + "/v1/chat/completions", json={**chat, "model": "x"}).status_code == 404
    assert httpx.get(live + "/v1/models/nope").status_code == 404
    for path in ("/nope", "/wp-login.php", "/v1/nope"):
        assert httpx.get(live + path).status_code == 404
    assert httpx.get(live + "/caption").status_code == 405
    after = metric_values(live)

    def grew(name: str, **labels: str) -> float:
        return _count(after, name, **labels) - _count(before, name, **labels)

    chat_route = "/v1/chat/completions"
    assert grew(REQUESTS, endpoint=chat_route, status="200") == 1
    assert grew(REQUESTS, endpoint=chat_route, status="404") == 1
    assert grew(LATENCY, endpoint=chat_route) == 2
    assert grew(REQUESTS, endpoint="/v1/models", status="200") == 1
    assert grew(REQUESTS, endpoint="/v1/models/{model_id:path}", status="404") == 1
    assert grew(REQUESTS, endpoint="unmatched", status="404") == 3
    assert grew(REQUESTS, endpoint="/caption", status="405") == 1
    assert grew(REQUESTS, endpoint="/metrics", status="200") == 1  # the scrape before
    endpoints = {dict(labels).get("endpoint") for name, labels in after if name == REQUESTS}
    assert "/nope" not in endpoints and "/wp-login.php" not in endpoints


def test_time_to_first_token_and_prompt_tokens_per_request(live, checkpoints):
    before = metric_values(live)
    one = httpx.post(live + "/caption", json={"image": b64(png_bytes(2)), "max_new_tokens": 4}).json()
    batch = {"images": [b64(png_bytes(3)), b64(png_bytes(4))], "max_new_tokens": 1}
    two = httpx.post(live + "/caption", json=batch).json()["captions"]
    vqa = {"image": b64(png_bytes(5)), "question": "what is it?", "max_new_tokens": 2, "num_beams": 2}
    three = httpx.post(live + "/vqa", json=vqa).json()
    after = settled(live, TTFT, _count(before, TTFT) + 4)
    prompts = one["usage"]["prompt_tokens"] + sum(c["usage"]["prompt_tokens"] for c in two)
    prompts += three["usage"]["prompt_tokens"]
    assert _count(after, TTFT) - _count(before, TTFT) == 4  # one first token per request
    assert _count(after, PROMPT) - _count(before, PROMPT) == prompts
    assert prompts > 4 * checkpoints("pre_ln")[1].config.num_query_tokens  # the image queries count too
    sum_name = "blipserve_time_to_first_token_seconds_sum"
    waited = _count(after, sum_name) - _count(before, sum_name)
    assert 0 < waited < 4 * one["timings"]["total_ms"] / 1000 + 10


def test_metrics_is_a_503_when_the_engine_does_not_answer_in_time():
    """A CPU engine answers metrics between steps: past METRICS_TIMEOUT_S the scrape gets a clear 503
    with Retry-After, not a 500."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.errors import install_handlers
    from server.routes import status

    async def unanswered() -> bytes:
        raise TimeoutError

    app = FastAPI()
    install_handlers(app)
    app.include_router(status.router)
    app.state.service = SimpleNamespace(lifecycle=SimpleNamespace(render_metrics=unanswered))
    response = TestClient(app).get("/metrics")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "did not answer within 5 s" in response.json()["error"]["message"]
