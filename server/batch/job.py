"""The batch job: every pending row of every shard through a backend, journaled, shards finished in turn.

Rows are read on a worker thread (a chunk at a time) and answered `concurrency` at a time, across shard
boundaries, so the engine's batch stays full; a shard's output is written as soon as its last row is in.
SIGTERM / SIGINT (`stop`) stops taking new rows: the rows in flight finish and are journaled, and the
unfinished shards wait for the next run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .backends import JobSpec, Unreachable, error_row, openai_error, openai_output
from .progress import Progress
from .sources import Columns, Row, Shard, ShardError
from .store import ShardStore, failed, row_schema

READ_CHUNK = 32


class Backend(Protocol):
    model_id: str

    async def answer(self, row: Row) -> dict[str, Any]: ...

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, str | None]: ...


@dataclass
class Options:
    """Where outputs go and how the job runs."""

    output: Path  # the output folder (or, for one OpenAI batch file, the output .jsonl file)
    fmt: str = "parquet"  # parquet | jsonl (datasets; OpenAI batch files always get OpenAI's JSONL)
    columns: Columns = field(default_factory=Columns)
    concurrency: int = 64
    retry_errors: bool = False
    progress: str = "bar"  # bar | plain | none


@dataclass
class Summary:
    rows: int = 0  # rows of every shard
    answered: int = 0  # rows answered in this run
    errors: int = 0  # rows of finished shards (or answered in this run) that failed
    shards: int = 0
    shards_done: int = 0
    skipped: int = 0  # rows answered by earlier runs
    interrupted: bool = False
    seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)  # shards that could not be read (why, each)
    unreachable: str | None = None  # why the server (--url) stopped the job

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def status(self) -> int:
        """The exit status: 0 all answered (or stopped by a signal, to resume), 1 rows failed or shards
        unreadable, 3 stopped because the server (--url) could not be reached (rerun to resume)."""
        if self.unreachable is not None:
            return 3
        return 0 if self.interrupted or (self.errors == 0 and not self.unreadable) else 1

    def line(self, output: Path) -> str:
        state = "stopped (rerun the same command to resume)" if self.interrupted else "done"
        bad = f", {len(self.unreadable)} unreadable (a rerun tries them again)" if self.unreadable else ""
        return (
            f"{state}: {self.shards_done}/{self.shards} shards{bad}, {self.rows} rows ({self.errors} errors); "
            f"this run answered {self.answered} in {self.seconds:.1f} s, {self.rate:.2f} images/s; outputs in "
            f"{output}"
        )


def warn(message: str) -> None:
    """One line on stderr, whatever the progress mode (a shard that failed is never silent)."""
    print(f"blipserve batch: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class ShardState:
    shard: Shard
    store: ShardStore
    total: int
    rows: dict[int, dict]  # answered (journal and earlier output), by index
    done: dict[int, str]  # index -> key of rows not to answer again
    in_flight: int = 0
    read_all: bool = False


def stores_for(shards: list[Shard], opts: Options, spec: JobSpec) -> list[ShardStore]:
    """The output files of each shard."""
    single = single_file(shards, opts)
    folder = opts.output.parent if single else opts.output
    schema = row_schema(spec.task == "vqa", spec.choices) if opts.fmt == "parquet" else None
    out = []
    for shard in shards:
        name = opts.output.stem if single else shard.name
        fmt = "openai" if shard.kind == "openai" else opts.fmt
        out.append(ShardStore(folder, name, fmt, schema if fmt == "parquet" else None))
    return out


def plan(shards: list[Shard], opts: Options, spec: JobSpec) -> tuple[list[ShardState], Summary]:
    """What is left to do: the unfinished shards and their answered rows (reads headers and journals).
    InputError when a parquet file lacks a column asked for; a shard that cannot be read is left out
    (`Summary.unreadable`, with a warning)."""
    summary = Summary(shards=len(shards))
    states = []
    for shard, store in zip(shards, stores_for(shards, opts, spec), strict=True):
        stats = store.stats()
        if stats is not None and not (opts.retry_errors and stats.get("errors")):
            store.drop_journal()
            summary.rows += stats["rows"]
            summary.errors += stats["errors"]
            summary.shards_done += 1
            summary.skipped += stats["rows"]
            continue
        try:
            total = shard.count(opts.columns)
        except ShardError as exc:
            summary.unreadable.append(str(exc))
            warn(f"{exc}; skipped")
            continue
        if stats is not None:
            store.forget_stats()
        rows = store.load()
        done = {i: r["key"] for i, r in rows.items() if not (opts.retry_errors and failed(r))}
        summary.rows += total
        summary.skipped += len(done)
        states.append(ShardState(shard, store, total, rows, done))
    return states, summary


def check_output(shards: list[Shard], opts: Options) -> None:
    """ValueError naming --output when it cannot hold the outputs: a file where the outputs' folder
    should be, a folder where an OpenAI batch output file should be, or the input's own folder (or
    file); creates the folder."""
    out = opts.output
    if single_file(shards, opts):
        if out.is_dir():
            raise ValueError(f"--output {out}: a folder; an OpenAI batch file's output is a .jsonl file")
        if out.resolve() == shards[0].path.resolve():
            raise ValueError(f"--output {out}: the input file itself")
        folder = out.parent
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output {out}: a file, not a folder (the outputs are one file per shard)")
        inputs = {(s.path if s.kind == "images" else s.path.parent).resolve() for s in shards}
        if out.resolve() in inputs:  # outputs would overwrite input files, or be read as input next time
            raise ValueError(
                f"--output {out}: the input's own folder; give the outputs a folder of their own"
            )
        folder = out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output {out}: cannot create {folder}: {exc.strerror or exc}") from None


def check_job_file(shards: list[Shard], opts: Options, spec: JobSpec, job: dict[str, Any]) -> None:
    """`_job.json` beside the outputs (`NAME.job.json` for one OpenAI batch output file) records what
    the job asks; a rerun must ask the same once rows are answered (a resumed shard must not mix
    answers to two different requests): ValueError otherwise. Before that (the last run failed to
    start), it is replaced."""
    stores = stores_for(shards, opts, spec)
    path = job_path(shards, opts)
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        started = any(p.exists() for s in stores for p in (s.journal_path, s.stats_path, s.output))
        if before == job:
            return
        if started:
            changed = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
            diff = "; ".join(
                f"{k}: {json.dumps(before.get(k))} then, {json.dumps(job.get(k))} now" for k in changed
            )
            raise ValueError(
                f"{path.parent} holds a job with other settings ({diff}): rerun it as it was, or use "
                "another --output"
            )
    path.write_text(json.dumps(job, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def single_file(shards: list[Shard], opts: Options) -> bool:
    """One OpenAI batch file in, one output file (`--output NAME.jsonl`) out."""
    return len(shards) == 1 and shards[0].kind == "openai" and opts.output.suffix == ".jsonl"


def job_path(shards: list[Shard], opts: Options) -> Path:
    if single_file(shards, opts):
        return opts.output.with_name(f"{opts.output.stem}.job.json")
    return opts.output / "_job.json"


async def answer(backend: Backend, spec: JobSpec, row: Row) -> dict[str, Any]:
    """The output row (dataset) or OpenAI output line (batch file) of one input row; never raises."""
    out: dict[str, Any] = {"index": row.index, "key": row.key}
    if row.request is not None:
        if row.error is not None:
            return {**out, "output": openai_output(row, None, None, None)}
        body = {"priority": spec.priority, **row.request["body"]}
        status, reply, request_id = await backend.post(row.request["url"], body)
        return {**out, "output": openai_output(row, status, reply, request_id)}
    if row.error is not None:
        return failure(spec, row, "invalid_request", row.error)
    if spec.task == "vqa":
        out["question"] = row.question if row.question is not None else spec.question
    return {**out, **await backend.answer(row)}


def failure(spec: JobSpec, row: Row, kind: str, message: str) -> dict[str, Any]:
    """A failed row in the shape of its shard's output (every format can write it): an OpenAI error
    line (`output`) for a batch request line, else a dataset row with `error` "KIND: message" (text
    and token counts null; the question for VQA)."""
    out: dict[str, Any] = {"index": row.index, "key": row.key}
    if row.request is not None:
        return {**out, "output": openai_error(row.key, kind, message)}
    if spec.task == "vqa":
        out["question"] = row.question if row.question is not None else spec.question
    return {**out, **error_row(f"{kind}: {message}")}


def _chunks(states: list[ShardState], columns: Columns) -> Iterator[tuple[ShardState, list[Row], str | None]]:
    """(shard, up to READ_CHUNK rows, None) in order; then (shard, [], None) once it is read, or
    (shard, [], why) when it cannot be read on (its rows read so far are answered; the rest wait)."""
    for state in states:
        rows = state.shard.rows(columns, state.done)
        try:
            while chunk := list(itertools.islice(rows, READ_CHUNK)):
                yield state, chunk, None
        except ShardError as exc:
            yield state, [], str(exc)
            continue
        yield state, [], None


class _InFlight:
    """The rows being answered, at most `opts.concurrency` at a time (`gate`): each journaled as it
    comes back, and its shard written once its last row is in."""

    def __init__(self, backend: Backend, spec: JobSpec, opts: Options, summary: Summary, stop: asyncio.Event):
        self.backend, self.spec, self.summary, self.stop = backend, spec, summary, stop
        self.progress = Progress(opts.progress, summary.rows, summary.skipped)
        self.gate = asyncio.Semaphore(opts.concurrency)
        self.tasks: set[asyncio.Task] = set()
        self.finishing: list[asyncio.Task] = []

    def submit(self, state: ShardState, row: Row) -> None:
        """Answer `row` (its gate slot taken) in a task of its own."""
        state.in_flight += 1
        task = asyncio.ensure_future(self._one(state, row))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, state: ShardState, row: Row) -> None:
        try:
            result = await answer(self.backend, self.spec, row)
        except Unreachable as exc:  # not the row's fault: stop; a rerun sends it again
            self.gate.release()
            state.in_flight -= 1
            if self.summary.unreachable is None:
                self.summary.unreachable = str(exc)
                self.progress.note(
                    f"blipserve batch: error: {exc}; stopping (rerun the same command to resume)"
                )
            self.stop.set()
            return
        except Exception as exc:  # a bug must not lose the row: it is an error, redone by --retry-errors
            result = failure(self.spec, row, "internal_error", repr(exc))
        self.gate.release()
        state.rows[row.index] = result
        state.store.append(result)
        state.in_flight -= 1
        self.summary.answered += 1
        self.progress.update(not failed(result))
        self.maybe_finish(state)

    def maybe_finish(self, state: ShardState) -> None:
        """Write the shard if it is read to its end and every row is in."""
        if state.read_all and state.in_flight == 0 and len(state.rows) >= state.total:
            self.finishing.append(asyncio.ensure_future(self._finish(state)))

    async def _finish(self, state: ShardState) -> None:
        info = {"input": str(state.shard.path), "model": self.backend.model_id, "task": self.spec.task}
        stats = await asyncio.to_thread(state.store.finish, state.rows, state.total, info)
        self.summary.shards_done += 1
        self.summary.errors += stats["errors"]

    async def drain(self) -> None:
        """Wait for the rows in flight and the shards being written."""
        if self.tasks:
            await asyncio.gather(*self.tasks)
        await asyncio.gather(*self.finishing)


async def run(
    backend: Backend,
    spec: JobSpec,
    opts: Options,
    states: list[ShardState],
    summary: Summary,
    stop: asyncio.Event,
) -> Summary:
    """Answer every pending row; write each shard once complete. Returns the summary (also on `stop`)."""
    start = time.monotonic()
    rows = _InFlight(backend, spec, opts, summary, stop)
    reader = _chunks(states, opts.columns)
    opener = asyncio.ensure_future(_open_on_stop(rows.gate, stop, opts.concurrency))
    try:
        while not stop.is_set():
            item = await asyncio.to_thread(next, reader, None)
            if item is None:
                break
            state, chunk, unreadable = item
            if unreadable is not None:
                summary.unreadable.append(unreadable)
                rows.progress.note(f"blipserve batch: warning: {unreadable}; the shard is left unfinished")
                continue
            if not chunk:
                state.read_all = True
                rows.maybe_finish(state)
                continue
            for row in chunk:
                await rows.gate.acquire()  # `opener` lets it through once `stop` is set
                if stop.is_set():
                    break
                rows.submit(state, row)
    finally:  # also on an error (a full disk): what is in flight is still journaled
        opener.cancel()
        await rows.drain()
        for state in states:
            state.store.close()
    summary.interrupted = stop.is_set() and summary.shards_done < summary.shards
    summary.seconds = time.monotonic() - start
    summary.errors += sum(failed(r) for s in states if not _finished(s) for r in s.rows.values())
    rows.progress.close(summary.line(opts.output))
    return summary


async def _open_on_stop(gate: asyncio.Semaphore, stop: asyncio.Event, slots: int) -> None:
    """Once `stop` is set, let every waiter on the gate through (each then sees `stop` and stops taking
    rows): one task for the job, not a second waiter per row."""
    await stop.wait()
    for _ in range(slots + 1):
        gate.release()


def _finished(state: ShardState) -> bool:
    return state.store.stats_path.exists()
