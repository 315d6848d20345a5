"""Image URLs: off by default; when on, SSRF checks before any connection, caps, no redirects."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from live import png_bytes, serve_in_thread

from server import fetch
from server.fetch import host_allowed, is_public
from server.service import Service
from server.settings import Settings

IMAGE = png_bytes(3)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "http://127.0.0.1:1/x")
            self.end_headers()
            return
        body = IMAGE if self.path == "/img.png" else b"x" * 200_000
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.9", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False), ("8.8.8.8", True),
        ("2606:4700::1111", True),
    ],
)  # fmt: skip
def test_public_address_check(address, public):
    assert is_public(address) is public


def test_allowlist():
    assert host_allowed("img.example.com", ["*.example.com"])
    assert host_allowed("example.com", ["example.com"])
    assert not host_allowed("evil-example.com", ["*.example.com"])
    assert host_allowed("anything.org", [])


def test_urls_are_refused_by_default(checkpoints, origin):
    settings = Settings(model=str(checkpoints("pre_ln")[0]), device="cpu", engine="thread")
    with serve_in_thread(settings) as url:
        r = httpx.post(url + "/caption", json={"image": origin + "/img.png"})
        assert r.status_code == 400 and "not fetched" in r.json()["error"]["message"]


def test_enabled_urls_block_private_addresses_and_enforce_caps(checkpoints, origin, monkeypatch):
    base = {
        "model": str(checkpoints("pre_ln")[0]),
        "device": "cpu",
        "engine": "thread",
        "allow_image_urls": True,
        "max_body_mb": 0.1,
    }
    with serve_in_thread(Settings(**base)) as url:
        for target in [
            origin + "/img.png",
            "http://localhost/x",
            "http://169.254.169.254/latest",
            "file:///etc/passwd",
        ]:
            r = httpx.post(url + "/caption", json={"image": target, "max_new_tokens": 2})
            assert r.status_code == 400, target
            assert "non-public" in r.json()["error"]["message"] or "http(s)" in r.json()["error"]["message"]
    monkeypatch.setattr(fetch, "is_public", lambda address: True)  # this test's origin server is on loopback
    svc = Service.build(Settings(**base))
    with serve_in_thread(svc.settings, svc) as url:
        ok = httpx.post(url + "/caption", json={"image": origin + "/img.png", "max_new_tokens": 2})
        assert ok.status_code == 200
        big = httpx.post(url + "/caption", json={"image": origin + "/big", "max_new_tokens": 2})
        assert big.status_code == 413
        hop = httpx.post(url + "/caption", json={"image": origin + "/redirect", "max_new_tokens": 2})
        assert hop.status_code == 400 and "redirect" in hop.json()["error"]["message"]
    svc = Service.build(Settings(**base, image_url_allowlist=["images.example.org"]))
    with serve_in_thread(svc.settings, svc) as url:
        r = httpx.post(url + "/caption", json={"image": origin + "/img.png"})
        assert r.status_code == 400 and "allowlist" in r.json()["error"]["message"]
