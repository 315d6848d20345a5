"""The README's examples run as written, against the quick-start server (tiny-random), with only the
address (and, for the Python API, the model and device) changed. Every fenced block is either run here or
listed in NOT_RUN with the reason (a GPU, a real model, the hub, Docker): a new block fails
`test_every_readme_block_is_run_or_listed` until it is one or the other."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from live import ROOT, png_bytes, serve_in_thread
from PIL import Image

from server.cli import _parser
from server.settings import CONFIG_DIR, Settings, load_settings

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", README, flags=re.S)]

# Blocks this file runs (a marker each block holds: the test that runs it).
RUN = {
    "curl -s localhost:8000/caption -F image=@cat.jpg": "test_readme_curl_examples_run",
    "-F questions=": "test_readme_multipart_questions_run",
    "from openai import OpenAI": "test_readme_openai_example_runs",
    "blipserve caption photos/": "test_readme_client_commands_run",
    "from server.client import BlipClient": "test_readme_python_client_runs",
    "from model import Blip2Engine": "test_readme_python_api_runs",
    "blipserve --config blip2-opt-2.7b": "test_readme_preset_comment_says_what_the_preset_sets",
    "blipserve batch photos/ -o captions/": "test_readme_batch_example_runs",
}
# Blocks that are not run here, and why.
NOT_RUN = {
    "python3 -m venv .venv": "installs into a new virtual environment (the CI's own set-up does this)",
    "python -m pytest -q": "the test suite itself",
    "docker build": "needs Docker and a GPU (the Docker tests build and run the image)",
    "HF_HUB_OFFLINE=1": "needs the Hugging Face hub, a real checkpoint and a GPU",
    "HTTP processes (FastAPI": "a diagram",
    "preprocess         fetching": "a diagram (the span tree; tests/test_tracing.py checks it)",
    '"finish_reason": "candidates"': "an example reply of a real model (tests/test_scoring.py checks the shape)",
    "blipserve batch 'shards/": "needs a real checkpoint, a running server and a Ray cluster (tests/test_batch_*.py run each way)",
    "from server.batch.ray_job import Captioner": "needs a Ray cluster and a real checkpoint (tests/test_batch_ray.py drives Captioner)",
}
# Run by another test file (the server it needs is built there).
RUN_ELSEWHERE = {
    "client.embeddings.create(": "tests/test_embeddings.py::test_the_readme_embeddings_snippet_runs"
}


def test_every_readme_block_is_run_or_listed():
    for language, code in BLOCKS:
        run = [m for m in RUN if m in code]
        skipped = [m for m in [*NOT_RUN, *RUN_ELSEWHERE] if m in code]
        assert len(run) + len(skipped) == 1, f"README block ({language}) is not run or listed:\n{code}"
    for marker in [*RUN, *NOT_RUN, *RUN_ELSEWHERE]:
        assert any(marker in code for _, code in BLOCKS), f"no README block holds {marker!r} any more"
    assert {name for name in RUN.values()} <= set(globals())


def _block(marker: str) -> str:
    (code,) = [code for _, code in BLOCKS if marker in code]
    return code


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The README's server (`blipserve` with no --model: tiny-random) and a folder holding cat.jpg."""
    folder = tmp_path_factory.mktemp("readme")
    Image.open(io.BytesIO(png_bytes(3, size=(64, 48)))).save(folder / "cat.jpg", format="JPEG")
    with serve_in_thread(Settings(engine="thread")) as url:
        yield url, folder


def _bash(script: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=120, env=env
    )


def _replies(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.replace("}{", "}\n{").splitlines() if line.strip()]


def test_readme_curl_examples_run(quick_start):
    url, folder = quick_start
    script = _block("curl -s localhost:8000/caption -F image=@cat.jpg")
    out = _bash(script.replace("localhost:8000", url.removeprefix("http://")), folder)
    replies = _replies(out.stdout)
    assert out.returncode == 0 and len(replies) == 2, out.stdout + out.stderr
    assert isinstance(replies[0]["caption"], str) and isinstance(replies[1]["answer"], str)


def test_readme_multipart_questions_run(quick_start):
    url, folder = quick_start
    out = _bash(_block("-F questions=").replace("localhost:8000", url.removeprefix("http://")), folder)
    (reply,) = _replies(out.stdout)
    assert out.returncode == 0 and len(reply["answers"]) == 2, out.stdout + out.stderr


def test_readme_openai_example_runs(quick_start, monkeypatch):
    url, folder = quick_start
    code = _block("from openai import OpenAI").replace("http://localhost:8000", url)
    monkeypatch.chdir(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().endswith("\n") and printed.getvalue().count("\n") == 1


def test_readme_client_commands_run(quick_start):
    url, folder = quick_start
    (folder / "photos").mkdir(exist_ok=True)
    for i in range(2):
        (folder / "photos" / f"p{i}.png").write_bytes(png_bytes(10 + i))
    script = _block("blipserve caption photos/").replace("http://gpu-host:8000", url)
    script = re.sub(r"^blipserve ", f"{shlex.quote(sys.executable)} -m server.cli ", script, flags=re.M)
    out = _bash(script, folder)
    replies = _replies(out.stdout)
    assert out.returncode == 0 and len(replies) == 3, out.stdout + out.stderr
    assert [Path(r["image"]).name for r in replies] == ["p0.png", "p1.png", "cat.jpg"]
    assert all(isinstance(r["text"], str) for r in replies)


def test_readme_batch_example_runs(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "a" / "cat.jpg").write_bytes(png_bytes(3))  # PNG bytes: read by content
    (tmp_path / "photos" / "dog.png").write_bytes(png_bytes(4))
    script = _block("blipserve batch photos/ -o captions/")
    script = re.sub(r"^blipserve ", f"{shlex.quote(sys.executable)} -m server.cli ", script, flags=re.M)
    out = _bash(script, tmp_path)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert out.returncode == 0 and len(rows) == 2, out.stdout + out.stderr
    assert sorted(r["key"] for r in rows) == ["a/cat.jpg", "dog.png"]
    assert all(isinstance(r["text"], str) and r["error"] is None for r in rows)


def test_readme_python_client_runs(quick_start, monkeypatch):
    url, folder = quick_start
    code = _block("from server.client import BlipClient").replace("http://gpu-host:8000", url)
    monkeypatch.chdir(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert printed.getvalue().count("\n") == 1


def test_readme_python_api_runs(quick_start, monkeypatch):
    _, folder = quick_start
    code = _block("from model import Blip2Engine")
    for real, tiny in (
        ("Salesforce/blip2-opt-2.7b", "tiny-random"),
        ('"cuda"', '"cpu"'),
        ("float16", "float32"),
    ):
        assert real in code
        code = code.replace(real, tiny)
    monkeypatch.chdir(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    captions, texts, ranked = (ast.literal_eval(line) for line in printed.getvalue().splitlines())
    assert len(captions) == 1 and len(texts) == 2 and all(isinstance(t, str) for t in captions + texts)
    assert sorted(ranked) == ["a cat", "a dog"]


def test_readme_preset_comment_says_what_the_preset_sets(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BLIPSERVE_"):
            monkeypatch.delenv(name)
    line = next(x for x in _block("blipserve --config blip2-opt-2.7b").splitlines() if "--config" in x)
    flags = {k: v for k, v in vars(_parser().parse_args(shlex.split(line.split("# = ", 1)[1]))).items()}
    given = {k for k, v in flags.items() if v is not None and k != "config"}
    preset = yaml.safe_load((CONFIG_DIR / "blip2-opt-2.7b.yaml").read_text())
    assert given == set(preset), f"the comment misses {set(preset) - given}, adds {given - set(preset)}"
    flags.pop("config")
    assert load_settings(None, **flags) == load_settings("blip2-opt-2.7b")
