"""Per-shard outputs of `blipserve batch`, and resuming them to the row.

For a shard named NAME, in the output folder:

- `NAME.progress.jsonl`, the journal: one JSON line per answered row (with its `index`), appended and
  flushed as rows finish, fsync'd at least every second. A crash (SIGKILL, preemption) loses at most the
  rows not yet written, which the next run redoes; a torn last line is ignored. A row written twice (a
  redone error) counts once: the last line of an index wins.
- `NAME.parquet` (or `NAME.jsonl`, or for an OpenAI batch file OpenAI's output lines), every row in
  input order, written once all rows are answered: to a temporary file, fsync'd, then renamed.
- `NAME.stats.json`, written last (the same way): the shard is done. The journal is removed after it.

A rerun skips shards with a stats file (removing a journal a kill left beside one) and, inside the others,
the rows in the output or the journal (with `retry_errors`, not those that failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

SYNC_EVERY_S = 1.0

_TOP = [("id", "int64"), ("token", "string"), ("logprob", "float64")]


def row_schema(vqa: bool, choices: bool) -> Any:
    """The parquet schema of a dataset shard's rows (pyarrow); `choices` only when asked for."""
    import pyarrow as pa

    top = pa.struct([(n, getattr(pa, t)()) for n, t in _TOP])
    logprob = pa.struct([*[(n, getattr(pa, t)()) for n, t in _TOP], ("top", pa.list_(top))])
    fields = [
        ("index", pa.int64()),
        ("key", pa.string()),
        *([("question", pa.string())] if vqa else []),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
    if choices:
        choice = pa.struct(
            [
                ("index", pa.int64()),
                ("text", pa.string()),
                ("finish_reason", pa.string()),
                ("logprobs", pa.list_(logprob)),
            ]
        )
        fields.append(("choices", pa.list_(choice)))
    return pa.schema(fields)


def failed(row: dict) -> bool:
    """Did this output row fail? (A dataset row's `error`; an OpenAI line's error or non-200 status.)"""
    if isinstance(row.get("output"), dict):
        out = row["output"]
        return out.get("error") is not None or (out.get("response") or {}).get("status_code") != 200
    return row.get("error") is not None or "output" in row


def openai_line(row: dict) -> dict:
    """A journaled row as an OpenAI batch output line: its `output`; a row without one (a failure
    recorded as a dataset row, as journals of earlier versions hold) becomes an error line."""
    out = row.get("output")
    if isinstance(out, dict):
        return out
    message = row.get("error") or "no answer was recorded for this line"
    code, _, detail = str(message).partition(": ")
    named = detail and code.isidentifier()  # "TYPE: message", as error rows write it
    error = {"code": code, "message": detail} if named else {"code": "internal_error", "message": message}
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": row.get("key"),
        "response": None,
        "error": error,
    }


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Any) -> None:
    """`write(temporary_path)`, fsync it, rename it to `path` (readers see the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class ShardStore:
    """The output files of one shard. `fmt`: parquet | jsonl | openai (OpenAI batch output lines)."""

    def __init__(self, folder: Path, name: str, fmt: str, schema: Any = None):
        self.folder = folder
        self.name = name
        self.fmt = fmt
        self.schema = schema
        suffix = "parquet" if fmt == "parquet" else "jsonl"
        self.output = folder / f"{name}.{suffix}"
        self.stats_path = folder / f"{name}.stats.json"
        self.journal_path = folder / f"{name}.progress.jsonl"
        self._journal: Any = None
        self._synced = 0.0

    def stats(self) -> dict | None:
        """The stats of a finished shard, or None."""
        try:
            return json.loads(self.stats_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def load(self) -> dict[int, dict]:
        """Rows answered so far by index: the output file's, then the journal's (the last line wins)."""
        rows = {r["index"]: r for r in self._read_output()}
        if self.journal_path.exists():
            with self.journal_path.open("rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue  # a line torn by a crash: that row is done again
                    if isinstance(row, dict) and isinstance(row.get("index"), int):
                        rows[row["index"]] = row
        return rows

    def _read_output(self) -> list[dict]:
        if not self.output.exists():
            return []
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(self.output).to_pylist()
        with self.output.open(encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if self.fmt == "openai":
            # Output lines in input order; index and key are those of the request line.
            return [{"index": i, "key": o["custom_id"], "output": o} for i, o in enumerate(lines)]
        return lines

    def drop_journal(self) -> None:
        """A finished shard whose journal is still there (killed between `finish`'s last two steps): the
        output holds every row, so the journal goes, as `finish` would have removed it."""
        self.journal_path.unlink(missing_ok=True)

    def forget_stats(self) -> None:
        """The shard is being redone (`--retry-errors`): no longer finished until written again."""
        self.stats_path.unlink(missing_ok=True)
        _fsync_dir(self.folder)

    def append(self, row: dict) -> None:
        """Journal one answered row (flushed at once: a killed process loses nothing written)."""
        if self._journal is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._journal = self.journal_path.open("a", encoding="utf-8")
        self._journal.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._journal.flush()
        now = time.monotonic()
        if now - self._synced > SYNC_EVERY_S:
            self.sync()
            self._synced = now

    def sync(self) -> None:
        """fsync the journal (a machine crash loses nothing written before)."""
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def close(self) -> None:
        if self._journal is not None:
            self.sync()
            self._journal.close()
            self._journal = None

    def finish(self, rows: dict[int, dict], total: int, info: dict[str, Any]) -> dict:
        """Write the output (rows 0..total-1 in order), then the stats file; remove the journal."""
        ordered = [rows[i] for i in range(total)]
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output, lambda tmp: self._write_rows(tmp, ordered))
        errors = sum(failed(r) for r in ordered)
        stats = {**info, "shard": self.name, "rows": total, "ok": total - errors, "errors": errors}
        stats["output"] = self.output.name
        stats["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_atomic(self.stats_path, lambda tmp: tmp.write_text(json.dumps(stats, indent=1) + "\n"))
        self.journal_path.unlink(missing_ok=True)
        return stats

    def _write_rows(self, path: Path, rows: list[dict]) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            names = self.schema.names
            table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=self.schema)
            pq.write_table(table, path)
            return
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(openai_line(r) if self.fmt == "openai" else r, ensure_ascii=False) + "\n")
