"""`blipserve batch --dp N`: N engine processes started, used and stopped by the job (slow: each engine
process loads the model in a fresh interpreter)."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
from batch_data import image_folder, read_rows
from test_batch_job import flags

from batching.engine_process import pid_alive
from server.batch.cli import run_batch

STARTED = re.compile(r"engine process (\d+) started \(pid (\d+)\)")
ADMITTED = re.compile(r"engine (\d+) \(cpu\) admitted (\d+) requests")


def run(tmp_path: Path, root: Path, out: str, *more: str) -> list[dict]:
    """The image folder's rows, answered by a job with `more` flags; all rows but the corrupt one ok."""
    folder = tmp_path / "images"
    assert run_batch(flags(root, str(folder), "-o", str(tmp_path / out), "--log-level", "info", *more)) == 1
    rows = read_rows(tmp_path / out / "images-00000.parquet")
    assert [r["error"] is None for r in rows] == [k != "bad.png" for k in sorted(r["key"] for r in rows)]
    return rows


@pytest.mark.slow
def test_dp_2_answers_as_one_engine_and_stops_its_engines(tmp_path, checkpoints, capsys) -> None:
    root = checkpoints("pre_ln")[0]
    images = image_folder(tmp_path / "images", 16, corrupt="bad.png")
    one = run(tmp_path, root, "one")
    capsys.readouterr()
    two = run(tmp_path, root, "two", "--dp", "2", "--max-running-seqs", "4")
    err = capsys.readouterr().err
    assert sorted(r["key"] for r in two) == sorted(images)  # every row, once
    keep = ("key", "text", "finish_reason", "error", "prompt_tokens", "completion_tokens")
    assert [{k: r[k] for k in keep} for r in two] == [{k: r[k] for k in keep} for r in one]
    # Both engines served rows: the 16 decodable images and one warm-up request between them.
    served = {int(i): int(n) for i, n in ADMITTED.findall(err)}
    assert sorted(served) == [0, 1] and sum(served.values()) == 16 + 1, err
    assert min(served.values()) >= 2, served
    # Both engine processes were started by the job and are gone after it.
    pids = [int(pid) for _, pid in STARTED.findall(err)]
    assert len(pids) == 2, err
    assert not any(pid_alive(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("blipserve-engine")]


def test_dp_flags_are_checked_before_anything_starts(tmp_path, capsys) -> None:
    image_folder(tmp_path / "images", 1)
    base = [str(tmp_path / "images"), "-o", str(tmp_path / "out")]
    cases = {
        ("--dp", "2", "--devices", "cpu"): "--devices names 1 devices for --dp 2",
        ("--dp", "2", "--url", "http://127.0.0.1:9"): "--dp is for the model in this process",
        ("--devices", "cpu,cpu"): "--devices names the devices of --dp N engines",
    }
    for more, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            run_batch([*base, *more])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
