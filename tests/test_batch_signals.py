"""`blipserve batch` as a subprocess: killed (SIGKILL) mid-job then rerun, and stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_data import expected, image_folder, read_rows
from live import ROOT

from model.engine import Blip2Engine
from server.batch.cli import run_batch

pytestmark = pytest.mark.slow  # each starts a Python with torch (10-20 s on a busy 2-core machine)

COUNT = 48


def job_args(root: Path, images: Path, out: Path) -> list[str]:
    # Two rows at a time, 30 tokens each: slow enough to be caught in the middle.
    return [
        str(images), "-o", str(out), "--model", str(root), "--device", "cpu", "--dtype", "float32",
        "--max-new-tokens", "30", "--max-running-seqs", "2", "--concurrency", "2", "--progress", "plain",
        "--shard-size", "8",
    ]  # fmt: skip


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "server.cli", "batch", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journaled(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob("*.progress.jsonl"))


def wait_for_a_shard(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    """Until the job has finished its first shard (5 more are left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.stderr.read()}")
        if list(out.glob("*.stats.json")):
            return
        time.sleep(0.05)
    raise TimeoutError("the job made no progress")


def all_rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("images-*.parquet")) for r in read_rows(p)]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, root) -> None:
    images = image_folder(tmp_path / "imgs", COUNT)
    out = tmp_path / "out"
    proc = start(job_args(root, tmp_path / "imgs", out))
    try:
        wait_for_a_shard(proc, out)
    finally:
        proc.kill()
        proc.wait(30)
    assert not (out / "images-00005.stats.json").exists()
    assert run_batch(job_args(root, tmp_path / "imgs", out)) == 0
    rows = all_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(images)  # none missing, none twice
    assert not list(out.glob("*.progress.jsonl"))

    whole = tmp_path / "whole"
    assert run_batch(job_args(root, tmp_path / "imgs", whole)) == 0
    assert rows == all_rows(whole)
    engine = Blip2Engine.load_dir(root, str(root), "cpu", "float32")
    want = expected(engine, images, max_new_tokens=30)
    assert {r["key"]: (r["text"], r["finish_reason"]) for r in rows} == want


def test_sigterm_writes_the_rows_in_flight_and_exits_0(tmp_path, root, capsys) -> None:
    image_folder(tmp_path / "imgs", COUNT)
    out = tmp_path / "out"
    proc = start(job_args(root, tmp_path / "imgs", out))
    try:
        wait_for_a_shard(proc, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (rerun the same command to resume)" in err
    summary = next(x for x in err.splitlines() if "this run answered" in x)
    answered = int(summary.split("this run answered ")[1].split()[0])
    finished = sum(len(read_rows(p)) for p in out.glob("*.parquet"))
    assert finished + journaled(out) == answered < COUNT  # every row it answered is on disk
    assert run_batch(job_args(root, tmp_path / "imgs", out)) == 0
    last = next(x for x in capsys.readouterr().err.splitlines() if "this run answered" in x)
    assert f"this run answered {COUNT - answered} " in last
    assert len(all_rows(out)) == COUNT
