"""The README's examples run as written: the curl commands and the OpenAI snippet, against the quick-start
server (tiny-random), with only the address changed."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from live import png_bytes, serve_in_thread
from PIL import Image

from server.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _block(language: str, marker: str) -> str:
    for code in re.findall(rf"```{language}\n(.*?)```", README, flags=re.S):
        if marker in code:
            return code
    raise AssertionError(f"no {language} block with {marker!r} in the README")


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The README's server (`blipserve` with no --model: tiny-random) and a folder holding cat.jpg."""
    folder = tmp_path_factory.mktemp("readme")
    Image.open(io.BytesIO(png_bytes(3, size=(64, 48)))).save(folder / "cat.jpg", format="JPEG")
    with serve_in_thread(Settings()) as url:
        yield url, folder


def test_readme_curl_examples_run(quick_start):
    url, folder = quick_start
    script = _block("bash", "curl -s localhost:8000/caption").replace(
        "localhost:8000", url.removeprefix("http://")
    )
    out = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    assert out.returncode == 0 and len(replies) == 2, out.stdout + out.stderr
    assert isinstance(replies[0]["caption"], str) and isinstance(replies[1]["answer"], str)


def test_readme_openai_example_runs(quick_start, monkeypatch):
    url, folder = quick_start
    code = _block("python", "from openai import OpenAI").replace("http://localhost:8000", url)
    monkeypatch.chdir(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().endswith("\n") and printed.getvalue().count("\n") == 1
