"""`blipserve batch` fed the wrong things: every mistake is one line and a documented exit status (no
traceback, nothing answered), a damaged shard fails alone, and a failed start leaves the output usable."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
from batch_data import (
    check_unbatchable,
    corrupt_second_row_group,
    expected,
    image_folder,
    openai_file,
    parquet_bytes,
    read_rows,
    unbatchable_file,
    webdataset,
)
from live import free_port, png_bytes, serve_in_thread

from server.batch import backends
from server.batch.cli import run_batch
from server.batch.sources import Columns, Shard, ShardError, find_shards
from server.batch.store import ShardStore
from server.settings import Settings


def flags(root: Path | str, *more: str) -> list[str]:
    base = ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"]
    return [*base, "--progress", "plain", "--max-running-seqs", "8", *more]


def usage_error(argv: list[str], capsys) -> str:
    """The one line a usage error prints (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_batch(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[0]


def test_column_options_are_checked_before_the_model_loads(tmp_path, capsys) -> None:
    """With a model that does not exist, the column mistake is what is reported: found before loading."""
    parquet_bytes(tmp_path / "data.parquet")
    image_folder(tmp_path / "imgs", 1)
    openai_file(tmp_path / "requests.jsonl", "m")
    nowhere = tmp_path / "no-model"
    cases = {
        (str(tmp_path / "data.parquet"), "--image-column", "nope"): "--image-column 'nope': no such column",
        (str(tmp_path / "data.parquet"), "--key-column", "id"): "--key-column 'id': no such column",
        (str(tmp_path / "imgs"), "--image-column", "jpg"): "are for parquet input",
        (str(tmp_path / "requests.jsonl"), "--task", "vqa", "--question-column", "q"): "is for parquet or",
        (str(tmp_path / "imgs"), "--question-column", "q"): "--question-column is for --task vqa",
    }
    for argv, message in cases.items():
        line = usage_error(flags(nowhere, *argv, "-o", str(tmp_path / "out")), capsys)
        assert message in line, line


def test_a_failed_start_leaves_the_output_usable(tmp_path, root, capsys) -> None:
    """A run refused before answering anything records no job the next run must repeat."""
    rows = parquet_bytes(tmp_path / "data.parquet")
    out = tmp_path / "out"
    usage_error(flags(root, str(tmp_path / "data.parquet"), "-o", str(out), "--image-column", "nope"), capsys)
    assert (
        run_batch(flags(root, str(tmp_path / "data.parquet"), "-o", str(out), "--image-column", "jpg")) == 1
    )
    assert [r["key"] for r in read_rows(out / "data.parquet")] == list(rows)
    # Once rows are answered, other settings are refused (a shard must not mix two jobs' answers).
    line = usage_error(
        flags(root, str(tmp_path / "data.parquet"), "-o", str(out), "--num-beams", "2"), capsys
    )
    assert "other settings" in line


def test_openai_outputs_side_by_side_keep_their_own_job(tmp_path, root) -> None:
    """Two OpenAI batch files answered into one folder with other options: neither refuses the other."""
    openai_file(tmp_path / "requests.jsonl", str(root))
    assert run_batch(flags(root, str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "a.jsonl"))) == 1
    more = flags(root, str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "b.jsonl"), "--num-beams", "2")
    assert run_batch(more) == 1
    assert len(read_rows(tmp_path / "a.jsonl")) == len(read_rows(tmp_path / "b.jsonl")) == 5
    assert not (tmp_path / "_job.json").exists()
    assert json.loads((tmp_path / "b.job.json").read_text())["params"]["num_beams"] == 2


def test_options_past_the_servers_limits_stop_before_any_row(tmp_path, root, capsys) -> None:
    image_folder(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    for option, value in (("--num-beams", "99"), ("--max-new-tokens", "100000"), ("--n", "99")):
        line = usage_error(flags(root, str(tmp_path / "imgs"), "-o", str(out), option, value), capsys)
        assert option.removeprefix("--").replace("-", "_") in line, line
        assert not list(out.glob("*.progress.jsonl")) and not list(out.glob("*.parquet"))


def test_wrong_numbers_urls_and_outputs_are_usage_errors(tmp_path, root, capsys) -> None:
    image_folder(tmp_path / "imgs", 1)
    (tmp_path / "file.txt").write_text("x")
    images = str(tmp_path / "imgs")
    cases = {
        ("--shard-size", "0"): "--shard-size: 0 is less than 1",
        ("--concurrency", "0"): "--concurrency: 0 is less than 1",
        ("--retries", "-1"): "--retries: -1 is less than 0",
        ("--url", "localhost:8000"): "expected http://HOST:PORT",
    }
    for more, message in cases.items():
        assert message in usage_error(flags(root, images, "-o", str(tmp_path / "o"), *more), capsys)
    line = usage_error(flags(root, images, "-o", str(tmp_path / "file.txt")), capsys)
    assert "--output" in line and "not a folder" in line
    line = usage_error(flags(root, images, "-o", str(tmp_path / "file.txt" / "sub")), capsys)
    assert "--output" in line and "cannot create" in line


def test_an_unreachable_server_is_one_line(tmp_path, capsys) -> None:
    image_folder(tmp_path / "imgs", 1)
    url = f"http://127.0.0.1:{free_port()}"
    line = usage_error(
        [str(tmp_path / "imgs"), "-o", str(tmp_path / "o"), "--url", url, "--retries", "0"], capsys
    )
    assert f"--url {url}" in line and "cannot reach the server" in line


def damaged_tar(path: Path) -> None:
    """A shard cut short by a failed copy."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            data = png_bytes(40 + i)
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue()[:1500])


def test_an_unreadable_shard_fails_alone(tmp_path, root, engine, capsys) -> None:
    images = webdataset(tmp_path / "shards")
    damaged_tar(tmp_path / "shards" / "00002.tar")
    (tmp_path / "shards" / "00003.tar").write_bytes(b"not a tar file at all")
    out = tmp_path / "out"
    assert run_batch(flags(root, str(tmp_path / "shards"), "-o", str(out))) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "00002.tar: cannot be read" in err and "00003.tar: cannot be read" in err
    assert "2/4 shards, 2 unreadable" in err
    want = expected(engine, {k: v for k, v in images.items() if v is not None})
    rows = read_rows(out / "00000.parquet") + read_rows(out / "00001.parquet")
    assert {r["key"]: (r["text"], r["finish_reason"]) for r in rows if r["error"] is None} == want
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["00000.stats.json", "00001.stats.json"]
    # A rerun skips the good shards without loading the model, and tries the damaged ones again.
    assert run_batch(flags(tmp_path / "no-model", str(tmp_path / "shards"), "-o", str(out))) == 1
    assert "00002.tar: cannot be read" in capsys.readouterr().err


def test_a_shard_unreadable_midway_keeps_its_first_rows(tmp_path, root, capsys) -> None:
    path = tmp_path / "data.parquet"
    corrupt_second_row_group(path, 256)
    with pytest.raises(ShardError, match="cannot be read after row 255"):
        list(Shard("data", "parquet", path).rows(Columns()))
    out = tmp_path / "out"
    assert run_batch(flags(root, str(path), "-o", str(out), "--format", "jsonl")) == 1
    err = capsys.readouterr().err
    assert "cannot be read after row 255" in err and "Traceback" not in err
    journal = read_rows(out / "data.progress.jsonl")
    assert sorted(r["index"] for r in journal) == list(range(256))
    assert all(r["error"] == "invalid_request: no image in this row" for r in journal)
    assert not (out / "data.stats.json").exists()


def test_a_finished_job_does_not_load_the_model(tmp_path, root, monkeypatch, capsys) -> None:
    image_folder(tmp_path / "imgs", 2)
    argv = flags(root, str(tmp_path / "imgs"), "-o", str(tmp_path / "out"))
    assert run_batch(argv) == 0

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("the model was loaded for a finished job")

    monkeypatch.setattr(backends.LocalBackend, "__init__", refuse)
    capsys.readouterr()
    assert run_batch(argv) == 0
    assert "done: 1/1 shards, 2 rows (0 errors); this run answered 0" in capsys.readouterr().err


def test_hidden_files_are_not_input(tmp_path) -> None:
    """macOS's `._name.jpg` companions, dot-files and dot-folders (.git, .cache) are skipped."""
    image_folder(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "._img000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "imgs" / ".cache").mkdir()
    (tmp_path / "imgs" / ".cache" / "thumb.png").write_bytes(png_bytes(1))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (shard,) = find_shards(str(tmp_path / "imgs"))
    assert [p.name for p in shard.files] == ["img000.png", "img001.png"]


def test_error_rows_have_every_field(tmp_path, root) -> None:
    image_folder(tmp_path / "imgs", 1, corrupt="bad.png")
    out = tmp_path / "out"
    assert run_batch(flags(root, str(tmp_path / "imgs"), "-o", str(out), "--format", "jsonl")) == 1
    good, bad = sorted(read_rows(out / "images-00000.jsonl"), key=lambda r: r["error"] is not None)
    assert set(good) == set(bad) and bad["prompt_tokens"] is None and bad["error"]


def test_progress_is_plain_lines_in_a_log(tmp_path, root, capsys) -> None:
    """Without --progress, stderr that is not a terminal (a log file, a pipe) gets lines, not a bar
    redrawn with carriage returns."""
    image_folder(tmp_path / "imgs", 2)
    argv = ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4"]
    assert run_batch([*argv, str(tmp_path / "imgs"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("done: 1/1 shards, 2 rows (0 errors)")


def test_several_inputs_are_the_shards_of_one_job(tmp_path, root, capsys) -> None:
    """`shards/*.tar` or an unquoted brace pattern, as the shell expands it: each file a shard."""
    webdataset(tmp_path / "shards")
    tars = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert run_batch(flags(root, *tars, "-o", str(tmp_path / "several"))) == 1
    assert run_batch(flags(root, str(tmp_path / "shards"), "-o", str(tmp_path / "folder"))) == 1
    for name in ("00000.parquet", "00001.parquet"):
        assert read_rows(tmp_path / "several" / name) == read_rows(tmp_path / "folder" / name)
    line = usage_error(flags(root, *tars, str(tmp_path / "nope.tar"), "-o", str(tmp_path / "o")), capsys)
    assert "nope.tar: no such file" in line


def test_the_input_folder_is_not_an_output(tmp_path, root, capsys) -> None:
    """Outputs beside the input files would overwrite them (NAME.parquet) or be read as input next time."""
    (tmp_path / "pq").mkdir()
    parquet_bytes(tmp_path / "pq" / "data.parquet")
    image_folder(tmp_path / "imgs", 1)
    openai_file(tmp_path / "requests.jsonl", str(root))
    for source, out in (("pq", "pq"), ("imgs", "imgs"), ("requests.jsonl", "requests.jsonl")):
        line = usage_error(flags(root, str(tmp_path / source), "-o", str(tmp_path / out)), capsys)
        assert "--output" in line and "input" in line, line
    assert (tmp_path / "pq" / "data.parquet").read_bytes()[:4] == b"PAR1"


def test_a_server_wanting_a_key_says_so(tmp_path, root, capsys) -> None:
    image_folder(tmp_path / "imgs", 1)
    settings = Settings(model=str(root), device="cpu", dtype="float32", engine="thread", api_key="sekrit")
    with serve_in_thread(settings) as url:
        base = [str(tmp_path / "imgs"), "-o", str(tmp_path / "o"), "--url", url, "--quiet"]
        assert "the server wants an API key" in usage_error(base, capsys)
        assert "refused the API key given" in usage_error([*base, "--api-key", "wrong"], capsys)
        assert run_batch([*base, "--api-key", "sekrit"]) == 0


def test_another_shard_size_is_another_job(tmp_path, root, capsys) -> None:
    """An image folder's shards are its files cut every --shard-size: resuming with another size would
    skip or repeat files."""
    image_folder(tmp_path / "imgs", 3)
    argv = flags(root, str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--shard-size", "2")
    assert run_batch(argv) == 0
    line = usage_error([*argv, "--shard-size", "1"], capsys)
    assert "shard_size: 2 then, 1 now" in line


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "openai"])
def test_an_internal_error_is_written_in_every_format(tmp_path, root, monkeypatch, fmt) -> None:
    """A bug answering a row (here forced: the backend raises) is that row's error in the shape of
    its output format; the output is still written and --retry-errors reruns it."""

    async def broken(self, *args) -> None:
        raise RuntimeError("forced")

    monkeypatch.setattr(backends.LocalBackend, "answer", broken)
    monkeypatch.setattr(backends.LocalBackend, "post", broken)
    if fmt == "openai":
        openai_file(tmp_path / "in.jsonl", str(root))
        argv, out = [str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "res.jsonl")], tmp_path / "res.jsonl"
    else:
        image_folder(tmp_path / "imgs", 2)
        argv = [str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--format", fmt]
        out = tmp_path / "out" / f"images-00000.{fmt}"
    for more in ([], ["--retry-errors"]):
        assert run_batch(flags(root, *argv, *more)) == 1
        rows = read_rows(out)
        if fmt == "openai":
            assert [r["custom_id"] for r in rows] == ["cap", "vqa", "line-3", "chat", "bad"]
            broken_rows = [r for r in rows if r["custom_id"] != "line-3"]
            assert all(r["response"] is None and r["error"]["code"] == "internal_error" for r in broken_rows)
            assert all("forced" in r["error"]["message"] for r in broken_rows)
        else:
            assert len(rows) == 2 and all(
                r["error"] == "internal_error: RuntimeError('forced')" for r in rows
            )
            assert all(r["text"] is None and r["prompt_tokens"] is None for r in rows)


def test_a_failed_row_without_an_openai_line_is_still_written(tmp_path) -> None:
    """A journal holding a failure as a dataset row (as earlier versions wrote an internal error) in an
    OpenAI batch output: written as OpenAI's error line, counted as an error."""
    store = ShardStore(tmp_path, "res", "openai")
    store.append({"index": 0, "key": "a", "text": None, "error": "internal_error: KeyError('x')"})
    store.append({"index": 1, "key": "b", "output": backends.openai_error("b", "invalid_request", "no")})
    stats = store.finish(store.load(), 2, {})
    assert stats["errors"] == 2
    a, b = read_rows(tmp_path / "res.jsonl")
    assert (a["custom_id"], a["response"], a["error"]) == (
        "a",
        None,
        {"code": "internal_error", "message": "KeyError('x')"},
    )
    assert (b["custom_id"], b["error"]["message"]) == ("b", "no")


def test_a_reply_that_is_not_json_is_an_error() -> None:
    """A route answering a stream of events (or a proxy's HTML page) with 200 is never an answered row."""
    sse = httpx.Response(200, text="data: {}\n\n", headers={"content-type": "text/event-stream"})
    status, body = backends.json_reply(sse)
    assert status == 502 and body["error"]["message"] == "HTTP 200 answered text/event-stream, not JSON"
    page = httpx.Response(504, text="<html>", headers={"content-type": "text/html; charset=utf-8"})
    assert backends.json_reply(page) == (
        504,
        {"error": {"type": "timeout", "message": "HTTP 504 answered text/html, not JSON"}},
    )
    assert backends.json_reply(httpx.Response(400, json={"error": {"type": "x"}})) == (
        400,
        {"error": {"type": "x"}},
    )


def test_streaming_lines_are_refused_and_the_job_goes_on(tmp_path, root) -> None:
    """`stream` (and `stream_options`) in a batch line: that line's error naming the field, as OpenAI's
    Batch API refuses it; the other lines are answered and the output written, also on a rerun."""
    unbatchable_file(tmp_path / "oai.jsonl", str(root))
    out = tmp_path / "oai_out.jsonl"
    for more in ([], ["--retry-errors"]):
        assert run_batch(flags(root, str(tmp_path / "oai.jsonl"), "-o", str(out), *more)) == 1
        check_unbatchable(out)


def test_openai_errors_name_the_files_own_line_numbers(tmp_path, root) -> None:
    """Blank lines count in the line numbers a user looks for (they were skipped before counting: the
    bad lines below were called line-2 and line-3)."""
    path = tmp_path / "requests.jsonl"
    path.write_text('[1, 2]\n\nnot json\n{"method": "POST"}\n')
    out = tmp_path / "results.jsonl"
    assert run_batch(flags(root, str(path), "-o", str(out))) == 1
    errors = {r["custom_id"]: r["error"]["message"] for r in read_rows(out)}
    assert errors == {
        "line-1": "line 1: custom_id (a string) is required",
        "line-3": "line 3: not valid JSON",
        "line-4": "line 4: custom_id (a string) is required",
    }
