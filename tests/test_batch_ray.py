"""`blipserve batch --ray` on a local Ray cluster equals the local job, and resumes from its journal;
`Captioner`, the public Ray Data actor class, called as Ray calls it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from batch_data import CORRUPT, corrupt_second_row_group, expected, parquet_paths, read_rows, webdataset
from live import png_bytes
from PIL import Image

from model.engine import Blip2Engine
from server.batch.cli import run_batch
from server.batch.ray_job import Captioner, read_task

ray = pytest.importorskip("ray")


def model_flags(root: Path) -> list[str]:
    return ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8", "--quiet"]


def test_captioner_answers_a_ray_batch(root) -> None:
    """Encoded bytes, a decoded array (`read_images`), a path and a bad row, in one batch."""
    captioner = Captioner(
        model=str(root), device="cpu", dtype="float32", spec={"params": {"max_new_tokens": 8}}
    )
    engine = Blip2Engine.load_dir(root, str(root), "cpu", "float32")
    pixels = np.asarray(Image.open(__import__("io").BytesIO(png_bytes(2))).convert("RGB"))
    batch = {
        "bytes": np.array([png_bytes(1), None, CORRUPT, None], dtype=object),
        "image": np.array([None, pixels, None, None], dtype=object),
        "path": np.array(["a.png", "b.png", "c.png", "/nonexistent.png"], dtype=object),
    }
    out = captioner(batch)
    want = expected(engine, {"a.png": png_bytes(1), "b.png": png_bytes(2)})
    assert list(out["key"]) == ["a.png", "b.png", "c.png", "/nonexistent.png"]
    assert (out["text"][0], out["finish_reason"][0]) == want["a.png"]
    assert (out["text"][1], out["finish_reason"][1]) == want["b.png"]
    assert out["error"][0] is None and out["error"][1] is None
    assert "image" in out["error"][2] and "could not be read" in out["error"][3]
    assert json.loads(out["row"][0])["completion_tokens"] == 8
    assert list(out["path"]) == list(batch["path"])


@pytest.mark.slow  # a Ray cluster takes 10-40 s to start here
def test_ray_mode_equals_local_mode_and_resumes(tmp_path, root) -> None:
    webdataset(tmp_path / "shards")
    (tmp_path / "pq").mkdir()
    parquet_paths(tmp_path / "pq" / "p.parquet")
    jobs = {
        "wds": [str(tmp_path / "shards")],
        "pq": [str(tmp_path / "pq"), "--image-column", "file", "--key-column", "id", "--format", "jsonl"],
    }
    for name, args in jobs.items():
        assert run_batch([*args, "-o", str(tmp_path / f"local-{name}"), *model_flags(root)]) == 1
    # A run that was stopped after one row of shard 00001: the journal's row must be kept, not redone.
    journal_row = {**read_rows(tmp_path / "local-wds" / "00001.parquet")[1], "text": "from the journal"}
    (tmp_path / "ray-wds").mkdir()
    (tmp_path / "ray-wds" / "00001.progress.jsonl").write_text(json.dumps(journal_row) + "\n")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for name, args in jobs.items():
            out = str(tmp_path / f"ray-{name}")
            assert (
                run_batch([*args, "-o", out, *model_flags(root), "--ray", "auto", "--ray-actors", "1"]) == 1
            )
    finally:
        ray.shutdown()
    for name in jobs:
        local = sorted((tmp_path / f"local-{name}").glob("*.*[qtl]"))
        remote = sorted((tmp_path / f"ray-{name}").glob("*.*[qtl]"))
        assert [p.name for p in local] == [p.name for p in remote] and local
        for a, b in zip(local, remote, strict=True):
            rows_a, rows_b = read_rows(a), read_rows(b)
            if a.name == "00001.parquet":
                assert rows_b[1]["text"] == "from the journal"
                rows_b[1]["text"] = rows_a[1]["text"]
            assert rows_a == rows_b, a.name
    assert not list((tmp_path / "ray-wds").glob("*.progress.jsonl"))


def test_a_read_task_keeps_the_rows_before_a_damaged_part(tmp_path, capsys) -> None:
    """A parquet file unreadable midway: the Ray read task gives the rows before it and a warning; the
    driver then counts the shard unfinished (its rows are short)."""
    path = tmp_path / "data.parquet"
    corrupt_second_row_group(path, 256)
    task = {"shard": 0, "name": "data", "kind": "parquet", "path": str(path), "files": [], "done": "{}",
            "columns": {"image": None, "key": None, "question": None}}  # fmt: skip
    rows = read_task(task)
    assert [r["index"] for r in rows] == list(range(256))
    assert "cannot be read after row 255" in capsys.readouterr().err
