"""What vLLM users expect: --served-model-name, --version and /version, /v1/models/{id}, vLLM's extra
sampling fields through the openai client's extra_body (against transformers), --root-path, TLS, access
logs without the probes, and the API description behind --api-key."""

from __future__ import annotations

import base64
import logging
import ssl
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from live import ROOT, b64, png_bytes, serve_in_thread
from test_server import oracle_text

from server.app import create_app
from server.cli import uvicorn_options
from server.settings import VERSION, Settings
from server.startup import bind

KEY = {"authorization": "Bearer k"}


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return checkpoints("pre_ln")


@pytest.fixture(scope="module")
def live(ckpt):
    settings = Settings(
        model=str(ckpt[0]),
        device="cpu",
        served_model_name=["blip-test", "alias"],
        root_path="/blip",
        access_log_exclude=["/health", "/metrics"],
        api_key="k",
        engine="thread",
    )
    with serve_in_thread(settings) as url:
        yield url


def _image_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_served_model_name_is_the_id_and_any_alias_is_accepted(live):
    models = httpx.get(live + "/v1/models", headers=KEY).json()["data"]
    assert [m["id"] for m in models] == ["blip-test"]
    for name in ("blip-test", "alias"):
        one = httpx.get(f"{live}/v1/models/{name}", headers=KEY)
        assert one.status_code == 200 and one.json()["id"] == "blip-test" and one.json()["object"] == "model"
    missing = httpx.get(live + "/v1/models/Salesforce/blip2-opt-2.7b", headers=KEY)
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "The model `Salesforce/blip2-opt-2.7b` does not exist.",
            "type": "invalid_request_error",  # as OpenAI answers it
            "param": "model",
            "code": "model_not_found",
        }
    }
    caption = httpx.post(live + "/caption", json={"image": b64(png_bytes(1))}, headers=KEY).json()
    assert caption["model"] == "blip-test"
    client = openai.OpenAI(base_url=live + "/v1", api_key="k")
    assert client.models.retrieve("alias").id == "blip-test"
    content = [{"type": "image_url", "image_url": {"url": _image_url(png_bytes(1))}}]
    chat = client.chat.completions.create(
        model="alias", messages=[{"role": "user", "content": content}], max_tokens=4
    )
    assert chat.model == "blip-test"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": content}], max_tokens=4
        )


def test_vllm_sampling_fields_through_extra_body_match_transformers(live, ckpt):
    data = png_bytes(4)
    client = openai.OpenAI(base_url=live + "/v1", api_key="k")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(data)}}]}]

    def chat(**kwargs):
        return client.chat.completions.create(model="blip-test", messages=messages, max_tokens=8, **kwargs)

    penalised = chat(temperature=0, extra_body={"repetition_penalty": 1.5, "min_tokens": 7})
    expected = oracle_text(ckpt, data, None, max_new_tokens=8, repetition_penalty=1.5, min_new_tokens=7)
    assert penalised.choices[0].message.content == expected
    assert penalised.usage.completion_tokens >= 7
    # top_k 1 leaves the sampler one choice: the greedy text, whatever the seed.
    greedy = oracle_text(ckpt, data, None, max_new_tokens=8)
    for seed in (1, 2, 3):
        sampled = chat(temperature=1.5, seed=seed, extra_body={"top_k": 1})
        assert sampled.choices[0].message.content == greedy
    # As /caption samples with the same top_k and seed (seeded draws are tested against transformers).
    native = {"do_sample": True, "temperature": 1.0, "top_k": 3, "seed": 11, "max_new_tokens": 8}
    body = {"image": b64(data), **native}
    caption = httpx.post(live + "/caption", json=body, headers=KEY).json()["caption"]
    sampled = chat(temperature=1.0, seed=11, extra_body={"top_k": 3})
    assert sampled.choices[0].message.content == caption
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        chat(extra_body={"repetition_penalty": 0})


def test_version_route_and_flag(live):
    assert httpx.get(live + "/version", headers=KEY).json() == {"version": VERSION}
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"blipserve {VERSION}"


def test_root_path_behind_a_proxy(live):
    schema = httpx.get(live + "/openapi.json", headers=KEY).json()
    assert schema["servers"] == [{"url": "/blip"}]
    assert "/blip/openapi.json" in httpx.get(live + "/docs", headers=KEY).text
    body = {"image": b64(png_bytes(2)), "max_new_tokens": 3}
    stripped = httpx.post(live + "/caption", json=body, headers=KEY)  # the proxy strips the prefix
    kept = httpx.post(live + "/blip/caption", json=body, headers=KEY)  # or passes it on
    assert stripped.status_code == kept.status_code == 200
    assert stripped.json()["caption"] == kept.json()["caption"]
    # The open routes stay open and the OpenAI error shape stays, under the prefix too.
    assert httpx.get(live + "/blip/health").status_code == 200
    assert httpx.get(live + "/blip/caption").status_code == 401
    missing = httpx.get(live + "/blip/v1/models/nope", headers=KEY).json()
    assert missing["error"]["code"] == "model_not_found"


def test_access_log_leaves_out_the_excluded_paths_but_counts_them(live, caplog):
    caplog.set_level(logging.INFO, logger="blipserve")
    for path in ("/health", "/metrics", "/version", "/blip/health"):
        assert httpx.get(live + path, headers=KEY).status_code == 200
    asked = ("/health", "/metrics", "/version", "/blip/health")  # an earlier test's line may come late
    paths = [getattr(r, "path", None) for r in caplog.records if hasattr(r, "status")]
    assert [p for p in paths if p in asked] == ["/version"], paths
    metrics = httpx.get(live + "/metrics").text
    assert 'blipserve_requests_total{endpoint="/health",status="200"}' in metrics


def test_api_description_needs_the_key_unless_told_otherwise():
    for settings, open_docs in (
        (Settings(api_key="k"), False),
        (Settings(api_key="k", auth_docs=False), True),
    ):
        client = TestClient(create_app(settings))
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == (200 if open_docs else 401), path
            assert client.get(path, headers=KEY).status_code == 200
        assert client.get("/health").status_code == 200


def test_tls_with_a_self_signed_certificate(ckpt, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(openssl, check=True, capture_output=True, timeout=60)
    settings = Settings(
        model=str(ckpt[0]),
        device="cpu",
        host="127.0.0.1",
        ssl_keyfile=str(key),
        ssl_certfile=str(cert),
        engine="thread",
    )
    listener = bind("127.0.0.1", 0)
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    client = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))
    try:
        _wait_ready_tls(client, url, thread)
        r = client.post(url + "/caption", json={"image": b64(png_bytes(1)), "max_new_tokens": 3})
        assert r.status_code == 200 and isinstance(r.json()["caption"], str)
        with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
            httpx.get(url + "/health")
        with pytest.raises(httpx.HTTPError):  # and no plain HTTP
            httpx.get(url.replace("https", "http") + "/health")
    finally:
        client.close()  # an open keep-alive connection held the server's shutdown for its 30 s join
        server.should_exit = True
        thread.join(30)


def _wait_ready_tls(client: httpx.Client, url: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert thread.is_alive()
        try:
            if client.get(url + "/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)
