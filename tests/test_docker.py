"""The Docker image, built and run (slow tier; `.ci/run` installs docker.io and debootstrap).

Where the public images and indexes cannot be reached, the Dockerfile's build arguments swap them for
stand-ins: a Debian bookworm base made with debootstrap (Python 3.11, this machine's CA bundle for pip's
TLS) for `python:3.11-slim` and for the CUDA base, and a PEP 503 index of this machine's torch wheel (and
its dependencies) on a loopback port for pytorch.org's. The classic builder (BuildKit's frontend image
cannot be pulled) with `--network host` reaches that index, PyPI and the Debian mirror.

The stand-in base image and its tarball, and the torch wheels, are cached (`BLIPSERVE_TEST_CACHE`, default
/var/cache/blipserve-test as root): the first run takes minutes, a re-run with unchanged dependencies seconds
plus the server's start.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from live import ROOT, b64, png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CACHE = Path(
    os.environ.get("BLIPSERVE_TEST_CACHE")
    or ("/var/cache/blipserve-test" if os.geteuid() == 0 else Path.home() / ".cache/blipserve-test")
)
MIRROR = os.environ.get("BLIPSERVE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = "blipserve-test/python:3.11-bookworm"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
INDEX_PORT = int(os.environ.get("BLIPSERVE_TEST_INDEX_PORT", "18777"))
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def sh(*cmd: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _apt_install(*packages: str) -> None:
    """apt-get install, as .ci/run does; the test is skipped (with why) where that is not possible."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(packages)} missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = sh("apt-get", "update", "-qq", timeout=600, env=env)
    install = sh(
        "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, timeout=900, env=env
    )
    if install.returncode != 0:
        pytest.skip(f"apt-get install {' '.join(packages)} failed: {(update.stderr + install.stderr)[-500:]}")


def _daemon_up() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", timeout=60).returncode == 0


@pytest.fixture(scope="module")
def docker() -> Iterator[None]:
    """A Docker daemon: the one running, or dockerd started here as root (and stopped after)."""
    if _daemon_up():
        yield
        return
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        _apt_install("docker.io")
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon is running and starting dockerd needs root")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while not _daemon_up():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (CACHE / "dockerd.log").read_text(errors="replace")[-800:]
            pytest.skip(f"dockerd could not be started here: {tail}")
        time.sleep(1)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(120)


def _debootstrap(tarball: Path) -> None:
    """Debian bookworm (minbase + Python 3.11) as a tarball, with this machine's CA bundle for pip."""
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    root = CACHE / "rootfs.tmp"
    shutil.rmtree(root, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(root), MIRROR]
    made = sh(*cmd, timeout=1800)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    # pip in the image trusts what pip here trusts (a TLS-inspecting proxy's CA included).
    bundle = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
    shutil.copy(bundle, root / "etc/ssl/certs/ca-certificates.crt")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    packed = sh("tar", "-C", str(root), "-cf", f"{tarball}.tmp", ".", timeout=600)
    assert packed.returncode == 0, packed.stderr
    os.replace(f"{tarball}.tmp", tarball)
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def base_image(docker) -> str:
    """The stand-in for python:3.11-slim (and for the CUDA base): imported once, then found by name."""
    if sh("docker", "image", "inspect", BASE).returncode == 0:
        return BASE
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball, start = CACHE / "bookworm-python3.11.tar", time.monotonic()
    if not tarball.exists():
        _debootstrap(tarball)
    made = sh("docker", "import", "--change", 'CMD ["python3"]', str(tarball), BASE, timeout=600)
    assert made.returncode == 0, made.stderr
    print(f"stand-in base image (debootstrap + docker import): {time.monotonic() - start:.0f} s")
    return BASE


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory) -> Iterator[str]:
    """A PEP 503 index of the torch installed here and its dependencies, served on a loopback port."""
    torch_version = version("torch")
    wheels = CACHE / "torch-wheels" / torch_version
    if not list(wheels.glob("torch-*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheels)]
        got = sh(*pip, f"torch=={torch_version}", timeout=1800)
        assert got.returncode == 0, got.stderr[-2000:]
    index = tmp_path_factory.mktemp("torch-index")
    for wheel in wheels.glob("*.whl"):
        project = index / "simple" / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).symlink_to(wheel)
        link = f'<a href="{urllib.parse.quote(wheel.name)}">{wheel.name}</a>'
        (project / "index.html").write_text(f"<!DOCTYPE html><html><body>{link}</body></html>\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=index)
    try:  # the same address each run: it is a build argument, part of the cached layers' key
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def build(target: str, base: str, torch_index: str) -> float:
    """`docker build --target TARGET` on the stand-ins; returns the seconds it took."""
    args = ["--build-arg", f"CPU_BASE={base}", "--build-arg", f"GPU_BASE={base}"]
    args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    tag = f"blipserve-test:{target}"
    before = sh("docker", "image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()
    start = time.monotonic()
    cmd = ["docker", "build", "--network", "host", "--target", target, "-t", tag]
    made = sh(*cmd, *args, str(ROOT), timeout=3000, env=BUILD_ENV)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    if before and before != sh("docker", "image", "inspect", "-f", "{{.Id}}", tag).stdout.strip():
        sh("docker", "rmi", before)  # the previous build's own layers (the cached ones are shared)
    seconds = time.monotonic() - start
    print(f"docker build --target {target}: {seconds:.0f} s")
    return seconds


def inspect(container: str, field: str) -> str:
    return sh("docker", "inspect", "-f", "{{" + field + "}}", container).stdout.strip()


@pytest.fixture(scope="module")
def cpu_server(base_image, torch_index) -> Iterator[tuple[str, str]]:
    """The CPU image, started with a preset and a 1 s health interval: (container name, its URL)."""
    build("cpu", base_image, torch_index)
    name = f"blipserve-test-{os.getpid()}"
    health = ["--health-interval", "1s", "--health-timeout", "5s", "--health-start-period", "300s"]
    run = sh("docker", "run", "-d", "--name", name, "-p", "127.0.0.1::8000", *health, "blipserve-test:cpu",
             "--config", "tiny-random", "--max-running-seqs", "4", "--graceful-timeout-s", "120")  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        url = "http://" + sh("docker", "port", name, "8000/tcp").stdout.split()[0]
        start, deadline = time.monotonic(), time.monotonic() + 300
        while time.monotonic() < deadline and inspect(name, ".State.Running") == "true":
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        logs = sh("docker", "logs", name).stderr[-3000:]
        assert httpx.get(url + "/ready", timeout=5).status_code == 200, logs
        print(f"docker run -> /ready 200: {time.monotonic() - start:.1f} s")
        yield name, url
    finally:
        sh("docker", "rm", "-f", "-v", name, timeout=120)  # -v: its anonymous /cache volume too


def test_cpu_image_serves_a_preset_as_non_root_and_turns_healthy(cpu_server):
    name, url = cpu_server
    r = httpx.post(url + "/caption", files={"image": ("a.png", png_bytes(1))}, data={"max_new_tokens": "4"})
    assert r.status_code == 200 and isinstance(r.json()["caption"], str), r.text
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny-random"  # --config tiny-random
    # The server (PID 1, exec form) runs as uid 10001, from site-packages (no source tree in the image).
    status = sh("docker", "exec", name, "cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s+10001", status, re.M), status
    where = sh("docker", "exec", name, "python", "-c", "import server, configs; print(server.__file__)")
    assert where.stdout.startswith("/opt/venv/lib/") and "site-packages/server/" in where.stdout, where
    assert sh("docker", "exec", name, "test", "-e", "/src").returncode == 1
    deadline = time.monotonic() + 60
    while inspect(name, ".State.Health.Status") != "healthy" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert inspect(name, ".State.Health.Status") == "healthy", inspect(name, "json .State.Health")


def test_docker_stop_drains_the_requests_in_flight_and_exits_0(cpu_server):
    name, url = cpu_server
    stream = {"image": b64(png_bytes(2)), "max_new_tokens": 128, "min_new_tokens": 128, "stream": True}
    beams = {"max_new_tokens": 128, "min_new_tokens": 128, "num_beams": 4}  # 4 of the 4 KV slots each
    streaming, events = threading.Event(), []

    def streamed() -> int:
        with httpx.stream("POST", url + "/caption", json=stream, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    streaming.set()
            return r.status_code

    def beam_search(i: int) -> int:
        return httpx.post(
            url + "/caption", json={"image": b64(png_bytes(i)), **beams}, timeout=300
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(streamed)
        assert streaming.wait(120), "the stream did not start"
        queued = [pool.submit(beam_search, i) for i in range(6)]  # one at a time: seconds of work queued
        time.sleep(0.5)
        start = time.monotonic()
        stopped = sh("docker", "stop", "-t", "150", name, timeout=300)
        seconds = time.monotonic() - start
        statuses = [first.result(300)] + [f.result(300) for f in queued]
    print(f"docker stop (SIGTERM, drain, exit): {seconds:.1f} s")
    logs = sh("docker", "logs", name)
    log = logs.stdout + logs.stderr
    assert stopped.returncode == 0 and inspect(name, ".State.ExitCode") == "0", log[-3000:]
    assert statuses == [200] * 7, statuses  # every request accepted before SIGTERM was answered
    assert events[-1].get("done") and events[-1]["usage"]["completion_tokens"] == 128, events[-1]
    # Some were answered after the server began to shut down: they were in flight or queued at SIGTERM.
    after = log.split("Shutting down", 1)[1]
    assert "POST /caption 200" in after and "0 requests left unfinished" in after, log[-3000:]


def test_gpu_image_starts_as_far_as_the_missing_gpu(base_image, torch_index):
    # The GPU target's steps on the stand-in base (the CUDA base cannot be pulled here), with the CPU torch.
    build("gpu", base_image, torch_index)
    run = sh("docker", "run", "--rm", "blipserve-test:gpu", timeout=300)  # the default command
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    assert "--device cuda: no CUDA device is visible" in out, out[-3000:]
    assert "Traceback" not in out and "presets" not in out and len(out.strip().splitlines()) <= 2, out
    bnb = sh(
        "docker", "run", "--rm", "--entrypoint", "python", "blipserve-test:gpu", "-c", "import bitsandbytes"
    )
    assert bnb.returncode == 0, bnb.stderr[-2000:]  # the llm-int8 extra is in the GPU image
