"""Start-up and shut-down: a config file that is not a YAML mapping and a port in use are a line and exit
status 2 (the port before any model loads); the server answers /health while the model loads; the engine
process is stopped without a false 'did not stop' warning, and its working directory never outlives it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import standin_engine
from live import ROOT, b64, free_port, png_bytes, wait_ready

from batching.engine_process import EngineProcess, remove_stale_workdirs
from server.cli import main
from server.settings import Settings


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_queue: [1, 2\n", "not valid YAML (line 2, column 1)"),
        ("model: a\n  device: cpu\n", "not valid YAML (line 2, column 9)"),
        ("- max_queue: 3\n", "expected a mapping of settings (e.g. 'max_queue: 512'), got a list"),
        ("just words\n", "expected a mapping of settings (e.g. 'max_queue: 512'), got a str"),
        (b"\xff\xfe max_queue: 1\n", "not valid YAML"),
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line_and_exit_2(tmp_path, capsys, text, words):
    path = tmp_path / "mine.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--config {path}: {words}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the line, and the --help hint


def test_a_port_in_use_fails_in_a_line_before_any_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port)]
        start = time.monotonic()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port} (Address already in use; another" in out.stderr
    assert "engine process started" not in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2 and took < 30, (took, out.stderr)


# The server of `python -m server.cli`, whose HTTP side waits for a file to exist before it connects to
# the engine: a model load as slow as the test wants.
SLOW_START = """
import asyncio, os, sys
from server.service import Service
start = Service.start
async def slow_start(self):
    while not os.path.exists(os.environ["GO"]):
        await asyncio.sleep(0.05)
    await start(self)
Service.start = slow_start
from server.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_health_answers_while_loading_and_a_killed_server_leaves_no_socket(checkpoints, tmp_path):
    work = Path(tempfile.mkdtemp(prefix="bs-", dir="/tmp"))  # short: an ipc:// path has 107 bytes at most
    go, port = tmp_path / "go", free_port()
    env = {**os.environ, "GO": str(go), "TMPDIR": str(work), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", SLOW_START, "--model", str(checkpoints("pre_ln")[0]), "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        health = _first_answer(url + "/health", proc)
        assert health.status_code == 200
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert ready.json()["error"]["message"] == "loading the model"
        r = httpx.post(url + "/caption", json={"image": b64(png_bytes(1))})
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["error"]["message"]
        assert "blipserve_ready 0.0" in httpx.get(url + "/metrics").text
        go.touch()
        deadline = time.monotonic() + 120
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert httpx.post(url + "/caption", json={"image": b64(png_bytes(1))}).status_code == 200
        (workdir,) = work.glob("blipserve-*")
        assert (workdir / "engine.sock").exists()
        engine = _children(proc.pid)
        proc.kill()  # no drain, no clean-up of its own: the engine process removes the directory
        proc.wait(30)
        deadline = time.monotonic() + 10
        while workdir.exists() or any(_running(pid) for pid in engine):
            assert time.monotonic() < deadline, list(workdir.iterdir())
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for path in work.iterdir():
            subprocess.run(["rm", "-rf", str(path)], check=False)
        work.rmdir()


def _first_answer(url: str, proc: subprocess.Popen) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _standin_owner(tmp_path: Path) -> EngineProcess:
    return EngineProcess(Settings(model="org/model"), tmp_path, target=standin_engine.engine)


@pytest.mark.slow  # 8 engine processes spawned and stopped, timed in wall seconds
def test_a_clean_engine_exit_is_never_taken_for_a_hang(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    caplog.set_level(logging.WARNING)
    for _ in range(8):
        owner = _standin_owner(tmp_path)
        exits: list[int | None] = []
        owner.start()
        owner.watch(exits.append)  # the server's main process watches, and stops it at the end
        time.sleep(0.2)
        start = time.monotonic()
        owner.stop(30)
        assert time.monotonic() - start < 10 and exits == [0] and owner.exitcode == 0
        assert not Path(owner._dir).exists()
    assert "did not stop" not in caplog.text


@pytest.mark.slow  # 4 engine processes spawned and reaped, timed in wall seconds
def test_an_engine_reaped_elsewhere_first_is_seen_as_stopped(tmp_path, caplog, monkeypatch):
    """The race of two waiters: when the other one reaps the process first, stop() must not wait for the
    timeout, warn and kill a process that is gone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    caplog.set_level(logging.WARNING)
    for _ in range(4):
        owner = _standin_owner(tmp_path)
        owner.start()
        other = threading.Thread(target=_collect, args=(owner.proc.pid,), daemon=True)
        other.start()  # already waiting when the process exits: it often collects the exit status first
        time.sleep(0.2)
        start = time.monotonic()
        owner.stop(10)  # the child imports batching.engine_process (torch) first: about 2 s here
        other.join(5)
        assert time.monotonic() - start < 8 and not owner.alive()  # not the 10 s of a missed exit
    assert "did not stop" not in caplog.text


def _collect(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_working_directories_of_servers_that_are_gone_are_removed_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live_dir, other = (
        tmp_path / f"blipserve-{dead.pid}-abc",
        tmp_path / f"blipserve-{os.getpid()}-def",
        tmp_path / "blipserve-notapid",
    )
    for path in (stale, live_dir, other):
        path.mkdir()
        (path / "engine.sock").touch()
    owner = _standin_owner(tmp_path)
    assert not stale.exists() and live_dir.exists() and other.exists()
    assert Path(owner._dir).name.startswith(f"blipserve-{os.getpid()}-")
    assert remove_stale_workdirs(tmp_path) == []
    os.rmdir(owner._dir)


@pytest.mark.slow
def test_sigterm_while_loading_drains_and_removes_the_working_directory(checkpoints, tmp_path):
    work = Path(tempfile.mkdtemp(prefix="bs-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "TMPDIR": str(work)}
    cmd = [sys.executable, "-m", "server.cli", "--model", str(checkpoints("pre_ln")[0]), "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _first_answer(f"http://127.0.0.1:{port}/health", proc)
        assert len(list(work.glob("blipserve-*"))) == 1
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out
        assert "did not stop" not in out and list(work.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.slow  # a signal to a server process: ~10 s on 2 cores
def test_sigterm_answers_the_requests_in_flight_then_exits_at_once():
    """`docker stop` gives 10 s before SIGKILL. The drain takes what the requests in flight need; after it,
    both processes used to spend seconds of CPU in the interpreter's last garbage collection (4-8 s
    from SIGTERM to exit on the busy 2-core CPU, idle). Now they leave at once, and the engine's last replies
    still go out before it does. Measured in CPU seconds after the last answer (the parent's and the
    engine's, from /proc, then wait4's total), which a busy machine stretches far less than wall time."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-running-seqs", "1"]  # one at a time: the others wait in the engine's queue
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    answers: list[int] = []
    count = 6
    answered = threading.Barrier(count + 1)

    def caption(seed: int) -> None:
        body = {"image": b64(png_bytes(seed)), "max_new_tokens": 128, "min_new_tokens": 128}
        try:
            answers.append(httpx.post(url + "/caption", json=body, timeout=120).status_code)
        finally:
            answered.wait(60)

    try:
        wait_ready(url, alive=lambda: proc.poll() is None)
        (engine,) = [pid for pid in _children(proc.pid) if b"resource_tracker" not in _cmdline(pid)]
        clients = [threading.Thread(target=caption, args=(seed,)) for seed in range(count)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while _gauge(url, "blipserve_queue_depth") + len(answers) < count - 1:  # all sent, some queued
            assert time.monotonic() < deadline, answers
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        answered.wait(60)
        cpu_at_last_answer = _cpu_seconds(proc.pid) + _cpu_seconds(engine)
        _, status, usage = os.wait4(proc.pid, 0)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert os.waitstatus_to_exitcode(status) == 0 and "Traceback" not in out, out
    assert "Waiting for connections to close" in out, out  # they were in flight at the signal
    assert answers == [200] * count, out
    assert "engine process done after" in out and "did not stop" not in out, out
    cpu_after = usage.ru_utime + usage.ru_stime - cpu_at_last_answer  # wait4: the server + its engine
    assert cpu_after < 0.5, (cpu_after, out)  # 1.6-2.0 before, 0.07 now (busy 2-core CPU)


def _gauge(url: str, name: str) -> float:
    """A gauge's value on the server's /metrics."""
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _cpu_seconds(pid: int) -> float:
    """The user + system CPU time `pid` has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
