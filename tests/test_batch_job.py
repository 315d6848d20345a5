"""`blipserve batch` in this process: every input kind, errors, outputs equal to `Blip2Engine.generate`,
resuming from a journal, --retry-errors, the OpenAI batch format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from batch_data import (
    QUESTION,
    expected,
    image_folder,
    openai_file,
    parquet_bytes,
    parquet_paths,
    read_rows,
    webdataset,
)
from live import png_bytes

from server.batch.cli import run_batch
from server.batch.sources import expand_braces


def flags(root: Path, *more: str) -> list[str]:
    base = ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"]
    return [*base, "--progress", "plain", "--max-running-seqs", "8", *more]


def answered(capsys) -> int:
    """How many rows the last run answered, from its summary line."""
    line = [x for x in capsys.readouterr().err.splitlines() if "this run answered" in x][-1]
    return int(line.split("this run answered ")[1].split()[0])


def check_rows(rows: list[dict], images: dict[str, bytes | None], want: dict[str, tuple[str, str]]) -> None:
    """Every row answered as generate answers it, or errored; no key missing or twice."""
    assert sorted(r["key"] for r in rows) == sorted(images)
    for r in rows:
        if r["key"] in want:
            assert (r["text"], r["finish_reason"]) == want[r["key"]], r["key"]
            assert r["error"] is None
        else:
            assert r["text"] is None and r["error"], r


def test_brace_pattern() -> None:
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]


def test_webdataset_vqa(tmp_path, root, engine) -> None:
    images = webdataset(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    out = tmp_path / "out"
    args = [pattern, "-o", str(out), "--task", "vqa", "--question-column", "question"]
    assert run_batch(flags(root, *args)) == 1  # some rows failed
    questions = {k: f"{QUESTION} {k}" for k in images}
    prompts = {k: f"Question: {q} Answer:" for k, q in questions.items()}
    want = expected(engine, {k: v for k, v in images.items() if v}, prompts)
    rows = read_rows(out / "00000.parquet") + read_rows(out / "00001.parquet")
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 0, 1, 2]
    assert [r["key"] for r in rows] == list(images)
    assert all(r["question"] == questions[r["key"]] for r in rows)
    errors = {r["key"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"000002", "000100"}
    assert "no image" in errors["000002"] and "image" in errors["000100"]
    for r in rows:
        if r["key"] in want:
            assert (r["text"], r["finish_reason"]) == want[r["key"]]
    stats = json.loads((out / "00001.stats.json").read_text())
    assert (stats["rows"], stats["ok"], stats["errors"]) == (3, 2, 1)
    assert not list(out.glob("*.progress.jsonl"))


def test_parquet_bytes_and_paths(tmp_path, root, engine) -> None:
    (tmp_path / "in").mkdir()
    by_bytes = parquet_bytes(tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    assert (
        run_batch(flags(root, str(tmp_path / "in" / "a.parquet"), "-o", str(out), "--format", "jsonl")) == 1
    )
    check_rows(read_rows(out / "a.jsonl"), by_bytes, expected(engine, by_bytes))

    (tmp_path / "paths").mkdir()
    by_path = parquet_paths(tmp_path / "paths" / "p.parquet")
    args = [
        str(tmp_path / "paths"),
        "-o",
        str(tmp_path / "out2"),
        "--image-column",
        "file",
        "--key-column",
        "id",
    ]
    assert run_batch(flags(root, *args)) == 1
    rows = read_rows(tmp_path / "out2" / "p.parquet")
    check_rows(rows, by_path, expected(engine, {k: v for k, v in by_path.items() if v}))
    assert "could not be read" in rows[2]["error"]


def test_folder_resumes_from_journal(tmp_path, root, engine, capsys) -> None:
    images = image_folder(tmp_path / "imgs", 10)
    out = tmp_path / "out"
    args = flags(root, str(tmp_path / "imgs"), "-o", str(out), "--shard-size", "4")
    assert run_batch(args) == 0
    assert answered(capsys) == 10
    names = ["images-00000", "images-00001", "images-00002"]
    whole = {n: read_rows(out / f"{n}.parquet") for n in names}
    check_rows([r for n in names for r in whole[n]], images, expected(engine, images))
    for shard in whole.values():  # keys are relative paths, shards are 4, 4, 2 images in order
        assert [r["index"] for r in shard] == list(range(len(shard)))

    # A crash in shard 1 after two rows (the second torn), shard 2 not begun: shard 0 is kept as is.
    for n in names[1:]:
        (out / f"{n}.parquet").unlink()
        (out / f"{n}.stats.json").unlink()
    journal = out / "images-00001.progress.jsonl"
    kept = json.dumps(whole["images-00001"][2]) + "\n"
    journal.write_text(kept + json.dumps(whole["images-00001"][0])[:25])
    # And shard 0 killed after its stats file was written but before its journal was removed.
    stale = out / "images-00000.progress.jsonl"
    stale.write_text(json.dumps(whole["images-00000"][0]) + "\n")
    assert run_batch(args) == 0
    assert answered(capsys) == 3 + 2
    assert {n: read_rows(out / f"{n}.parquet") for n in names} == whole
    assert not journal.exists() and not stale.exists()
    assert run_batch(args) == 0  # all done: nothing to answer
    assert answered(capsys) == 0


def test_retry_errors(tmp_path, root, engine, capsys) -> None:
    images = image_folder(tmp_path / "imgs", 3, corrupt="zz.png")
    out = tmp_path / "out"
    args = flags(root, str(tmp_path / "imgs"), "-o", str(out), "--format", "jsonl")
    assert run_batch(args) == 1
    first = read_rows(out / "images-00000.jsonl")
    assert [r["key"] for r in first if r["error"]] == ["zz.png"]
    (tmp_path / "imgs" / "zz.png").write_bytes(png_bytes(42))  # repaired
    assert run_batch(args) == 1  # a finished shard is not redone without --retry-errors
    answered(capsys)
    assert run_batch([*args, "--retry-errors"]) == 0
    assert answered(capsys) == 1
    images["zz.png"] = png_bytes(42)
    second = read_rows(out / "images-00000.jsonl")
    check_rows(second, images, expected(engine, images))
    assert second[:3] == first[:3]


def test_changed_job_is_refused(tmp_path, root, capsys) -> None:
    image_folder(tmp_path / "imgs", 1)
    out = str(tmp_path / "out")
    assert run_batch(flags(root, str(tmp_path / "imgs"), "-o", out)) == 0
    with pytest.raises(SystemExit) as exc:
        run_batch(flags(root, str(tmp_path / "imgs"), "-o", out, "--num-beams", "2"))
    assert exc.value.code == 2
    assert "params" in capsys.readouterr().err


def test_openai_batch_file(tmp_path, root, engine) -> None:
    lines = openai_file(tmp_path / "requests.jsonl", str(root))
    out = tmp_path / "results.jsonl"
    assert run_batch(flags(root, str(tmp_path / "requests.jsonl"), "-o", str(out))) == 1
    results = read_rows(out)
    assert [r["custom_id"] for r in results] == ["cap", "vqa", "line-3", "chat", "bad"]
    by_id = {r["custom_id"]: r for r in results}
    image = {"x": png_bytes(9)}
    cap = expected(engine, image, max_new_tokens=6)["x"]
    vqa = expected(engine, image, {"x": "Question: what? Answer:"}, max_new_tokens=30)["x"]
    chat = expected(engine, image, {"x": "Question: what is it? Answer:"}, max_new_tokens=6)["x"]
    assert by_id["cap"]["response"]["status_code"] == 200
    assert by_id["cap"]["response"]["body"]["caption"] == cap[0]
    assert by_id["vqa"]["response"]["body"]["answer"] == vqa[0]
    assert by_id["chat"]["response"]["body"]["choices"][0]["message"]["content"] == chat[0]
    assert by_id["bad"]["response"]["status_code"] == 400 and by_id["bad"]["error"] is None
    assert by_id["line-3"]["response"] is None and "not valid JSON" in by_id["line-3"]["error"]["message"]
    assert all(r["id"].startswith("batch_req_") for r in results)
    assert by_id["cap"]["response"]["request_id"]
    assert len(lines) == 4
    stats = json.loads((tmp_path / "results.stats.json").read_text())
    assert (stats["rows"], stats["errors"]) == (5, 2)


def test_bad_input_is_a_usage_error(tmp_path, root, capsys) -> None:
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "empty")], [str(tmp_path / "nope.tar")], [str(tmp_path / "x.txt")]):
        with pytest.raises(SystemExit) as exc:
            run_batch(flags(root, *argv, "-o", str(tmp_path / "o")))
        assert exc.value.code == 2
    assert "no images" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "empty")


def test_url_rows_go_through_the_ssrf_checks(tmp_path, root) -> None:
    """URLs are refused without --allow-image-urls, and with it a loopback address is (a row error each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/cat.jpg"], "jpg": [png_bytes(1)]}), path)
    args = flags(root, str(path), "--image-column", "url", "--format", "jsonl")
    assert run_batch([*args, "-o", str(tmp_path / "a")]) == 1
    assert "--allow-image-urls" in read_rows(tmp_path / "a" / "urls.jsonl")[0]["error"]
    assert run_batch([*args, "-o", str(tmp_path / "b"), "--allow-image-urls"]) == 1
    assert "non-public address" in read_rows(tmp_path / "b" / "urls.jsonl")[0]["error"]
