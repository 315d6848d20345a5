"""Test helpers: a real uvicorn server on a loopback port, in a thread or in a subprocess."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import uvicorn
from PIL import Image

from server.app import create_app
from server.service import Service
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server stopped before it was ready")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def serve_in_thread(settings: Settings, service: Service | None = None) -> Iterator[str]:
    """uvicorn in a background thread of this process (so tests can reach into the service)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, service), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serve_in_process(
    *flags: str, log: IO[str] | None = None, entry: str = "server.cli"
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m server.cli` in a subprocess (for signals, or to keep its threads out of this interpreter).

    Its output goes to `proc.stdout` (a pipe the caller reads), or to `log` for a long-running server whose
    unread output would otherwise fill the pipe and stall it. `entry`: another module to run, from tests/
    (`slow_engines`: the CLI with engines slowed down)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if entry != "server.cli":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", entry, "--host", "127.0.0.1", "--port", str(port), *flags]
    out = subprocess.PIPE if log is None else log
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=lambda: proc.poll() is None)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def png_bytes(seed: int, size: tuple[int, int] = (80, 60), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
