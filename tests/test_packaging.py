"""What a non-editable install holds: the wheel carries the presets (configs/) and starts a preset from any
working directory; bitsandbytes is an extra, and --quantize llm.int8 without it is one clear line."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from live import ROOT, free_port, png_bytes, wait_ready

SOURCES = ("pyproject.toml", "README.md", "model", "server", "batching", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the sources (the build leaves build/ and *.egg-info behind)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("blipserve-*.whl")
    return built


@pytest.mark.slow  # builds the wheel (pip wheel)
def test_the_wheel_carries_every_preset(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    presets = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert len(presets) >= 10 and presets <= names, presets - names


@pytest.mark.slow  # builds the wheel (pip wheel)
def test_bitsandbytes_is_an_extra_not_a_requirement(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = email.message_from_bytes(zf.read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA"))
    requires = meta.get_all("Requires-Dist")
    bnb = [r for r in requires if r.startswith("bitsandbytes")]
    assert bnb and all('extra == "llm-int8"' in r or 'extra == "dev"' in r for r in bnb), bnb
    assert "llm-int8" in meta.get_all("Provides-Extra")
    assert not [
        r for r in requires if "extra ==" not in r and r.split(">")[0] in {"pytest", "ruff", "transformers"}
    ]


@pytest.mark.slow  # builds and installs the wheel in a venv, starts a server
def test_an_installed_wheel_starts_a_preset_from_another_directory(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    # Only the install on the path: the checkout (this test's PYTHONPATH) must not lend its configs/.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    port = free_port()
    serve = [
        sys.executable,
        str(target / "bin" / "blipserve"),
        "--config",
        "tiny-random",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        serve, cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        r = httpx.post(
            url + "/caption", files={"image": ("a.png", png_bytes(1))}, data={"max_new_tokens": "3"}
        )
        assert r.status_code == 200 and isinstance(r.json()["caption"], str), r.text
        models = httpx.get(url + "/v1/models").json()["data"]
        assert models[0]["id"] == "tiny-random"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    where = subprocess.run(
        [sys.executable, "-c", "import server, configs; print(server.__file__); print(list(configs.__path__))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.stdout.count(str(target)) == 2, where.stdout + where.stderr


def test_llm_int8_without_bitsandbytes_is_one_line_and_exit_2():
    # sys.modules[name] = None makes `import bitsandbytes` raise ModuleNotFoundError, as when it is absent.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; from server.cli import main; "
        "main(['--quantize', 'llm.int8', '--device', 'cpu', '--port', '1'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2, out.stderr
    assert "--quantize llm.int8: needs bitsandbytes" in out.stderr
    assert 'pip install "blipserve[llm-int8]"' in out.stderr
