"""`blipserve batch --ray`: the same job as a Ray Data pipeline, and `Captioner`, its public actor class.

    shards (what is left of each: the journals) -> flat_map(read rows) -> map_batches(Captioner, one
    engine per actor: a GPU each when the cluster has them) -> the driver journals every answered row
    and writes each shard's output once complete, exactly as the local job does (so a rerun resumes it).

Reading (tar, parquet, image files) runs in Ray tasks: on a cluster, the input must be on a file system
every node sees. `Captioner` in a pipeline of your own:

    import ray
    from server.batch.ray_job import Captioner

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)   # columns: bytes, path
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "Salesforce/blip2-opt-2.7b",
                        "dtype": "float16"}, concurrency=4, num_gpus=1, batch_size=64)
    ds.write_parquet("s3://bucket/captions/")      # columns: key, text, finish_reason, error (+ the rest)

Ray needs more logical CPUs than the actors take, or its read tasks starve and the pipeline stalls.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..settings import Settings
from .backends import JobSpec
from .job import Options, ShardState, Summary, answer
from .progress import Progress
from .sources import Columns, Row, Shard, ShardError
from .store import failed

RAY_BATCH = 32


class Captioner:
    """A Ray Data actor holding one engine (`map_batches(Captioner, ...)`), answering batches of rows.

    Input columns: `image` or `bytes` (encoded image bytes; or a decoded uint8 [H, W, 3] array, as
    `read_images` gives), or `path` / `url` (read or fetched here); optional `key` (default: `path`, else
    the row number), `question` (VQA, per row), `index`. Output columns: `key`, `text`, `finish_reason`,
    `error` (None unless the row failed: a bad row never fails the batch), `row` (the whole output row as
    JSON: usage, choices when asked) and the input's other columns (`shard`, `index`, ...) as given.

    `settings`: the server's settings (a dict: model, device, dtype, limits...); keyword arguments
    are merged into it. `spec`: the task (`task`, `prompt`, `question`, `params`, `priority`), checked
    against the model when the actor starts unless `check_spec` is False (rows that are OpenAI batch
    lines carry their own).
    """

    def __init__(
        self,
        settings: dict | None = None,
        spec: dict | None = None,
        check_spec: bool = True,
        **settings_kwargs: Any,
    ):
        from .backends import LocalBackend

        merged = {**(settings or {}), **settings_kwargs}
        self.spec = JobSpec(**(spec or {}))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="captioner-loop", daemon=True)
        self._thread.start()
        self.backend = LocalBackend(Settings(**merged), self.spec)
        self._run(self.backend.start(check=check_spec))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Answer one batch (all its rows at once, into the engine's continuous batching)."""
        rows = rows_of(batch)

        async def all_rows() -> list[dict]:
            return list(await asyncio.gather(*(answer(self.backend, self.spec, row) for row in rows)))

        results = self._run(all_rows())
        out = {k: v for k, v in batch.items() if k not in ("image", "bytes", "request")}
        out["key"] = np.array([r["key"] for r in results], dtype=object)
        for name in ("text", "finish_reason", "error"):
            out[name] = np.array([r.get(name) for r in results], dtype=object)
        out["row"] = np.array([json.dumps(r, ensure_ascii=False) for r in results], dtype=object)
        return out

    def __del__(self) -> None:
        if getattr(self, "backend", None) is not None and self._loop.is_running():
            self._run(self.backend.close())
            self._loop.call_soon_threadsafe(self._loop.stop)


def _cell(batch: dict[str, np.ndarray], name: str, i: int) -> Any:
    if name not in batch:
        return None
    value = batch[name][i]
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and value != value else value  # a null cell may read as NaN


def rows_of(batch: dict[str, np.ndarray]) -> list[Row]:
    """A Ray batch's rows as the job's `Row`s (see `Captioner` for the columns)."""
    count = len(next(iter(batch.values())))
    rows = []
    for i in range(count):
        image = _cell(batch, "image", i)
        image = _cell(batch, "bytes", i) if image is None else image
        path, url = _cell(batch, "path", i), _cell(batch, "url", i)
        if image is None:
            image = url if url is not None else Path(path) if path is not None else None
        key = _cell(batch, "key", i)
        key = key if key is not None else path if path is not None else str(i)
        index = _cell(batch, "index", i)
        request = _cell(batch, "request", i)
        row = Row(int(index) if index is not None else i, str(key), image, _cell(batch, "question", i))
        row.request = json.loads(request) if request is not None else None
        row.error = _cell(batch, "error", i)
        if row.image is None and row.error is None and row.request is None:
            row.error = "no image in this row (image, bytes, path or url)"
        rows.append(row)
    return rows


def read_task(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A shard's pending rows as Ray rows (runs in a Ray task: files are read there)."""
    shard = Shard(task["name"], task["kind"], Path(task["path"]), [Path(f) for f in task["files"]])
    done = {int(k): v for k, v in json.loads(task["done"]).items()}
    out: list[dict[str, Any]] = []
    try:
        for row in shard.rows(Columns(**task["columns"]), done):
            out.append(_ray_row(task["shard"], row))
    except ShardError as exc:  # the rows read so far go on; the driver counts the shard unfinished
        print(f"blipserve batch: warning: {exc}; the shard is left unfinished", file=sys.stderr, flush=True)
    return out


def _ray_row(shard: int, row: Row) -> dict[str, Any]:
    """A Row as a Ray row (a path read here, on the node of the task)."""
    image = row.image
    if isinstance(image, Path):
        try:
            image = image.read_bytes()
        except OSError as exc:
            row.error = f"image file {str(image)!r} could not be read: {exc.strerror or exc}"
            image = None
    return {
        "shard": shard,
        "index": row.index,
        "key": row.key,
        "image": image if isinstance(image, bytes) else None,
        "url": image if isinstance(image, str) else None,
        "question": row.question,
        "request": json.dumps(row.request) if row.request is not None else None,
        "error": row.error,
    }


def _tasks(states: list[ShardState], columns: Columns) -> list[dict[str, Any]]:
    return [
        {
            "shard": i,
            "name": s.shard.name,
            "kind": s.shard.kind,
            "path": str(s.shard.path),
            "files": [str(f) for f in s.shard.files],
            "done": json.dumps({str(k): v for k, v in s.done.items()}),
            "columns": vars(columns),
        }
        for i, s in enumerate(states)
    ]


def run_ray(
    address: str,
    actors: int | None,
    settings: Settings,
    spec: JobSpec,
    opts: Options,
    states: list[ShardState],
    summary: Summary,
) -> Summary:
    """Run the pending rows through a Ray Data pipeline on the cluster at `address` ("auto": the one
    RAY_ADDRESS names or one started here); journal and write shards on this driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address in ("auto", "local") else address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows and errors
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or max(gpus, 1)
    device = settings.device if settings.device != "auto" else ("cuda" if gpus else "cpu")
    kwargs = {
        "settings": settings.model_copy(update={"device": device}).model_dump(mode="json"),
        "spec": {"task": spec.task, "prompt": spec.prompt, "question": spec.question, "params": spec.params,
                 "priority": spec.priority},
        "check_spec": any(s.shard.kind != "openai" for s in states),
    }  # fmt: skip
    if settings.api_key is not None:
        kwargs["settings"]["api_key"] = settings.api_key.get_secret_value()
    pending = [s for s in states if len(s.done) < s.total]
    start = time.monotonic()
    progress = Progress(opts.progress, summary.rows, summary.skipped)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if pending:
            ds = ray.data.from_items(_tasks(pending, opts.columns), override_num_blocks=len(pending))
            ds = ds.flat_map(read_task).map_batches(
                Captioner,
                fn_constructor_kwargs=kwargs,
                compute=ray.data.ActorPoolStrategy(size=count),
                num_gpus=1 if gpus else 0,
                batch_size=RAY_BATCH,
                batch_format="numpy",
            )
            _consume(ds, pending, summary, progress, stop, (spec, settings.model))
        for state in states:  # shards whose rows were all answered before (a crash before writing)
            if len(state.done) >= state.total and not state.store.stats_path.exists():
                _write(state, summary, spec, settings.model)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for state in states:
            state.store.close()
    summary.interrupted = stop.is_set() and summary.shards_done < summary.shards
    summary.seconds = time.monotonic() - start
    summary.errors += sum(
        failed(r) for s in states if not s.store.stats_path.exists() for r in s.rows.values()
    )
    progress.close(summary.line(opts.output))
    return summary


def _consume(ds: Any, pending: list[ShardState], summary: Summary, progress: Progress, stop: threading.Event,
             job: tuple[JobSpec, str]) -> None:  # fmt: skip
    """Journal the answered rows as they stream back; write each shard once complete."""
    left = [s.total - len(s.done) for s in pending]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for shard, row in zip(batch["shard"], batch["row"], strict=True):
            state = pending[int(shard)]
            result = json.loads(row)
            state.rows[result["index"]] = result
            state.store.append(result)
            summary.answered += 1
            progress.update(not failed(result))
            left[int(shard)] -= 1
            if left[int(shard)] == 0:
                _write(state, summary, *job)
        if stop.is_set():
            return
    for state, rows in zip(pending, left, strict=True):  # a shard that could not be read to its end
        if rows > 0:
            summary.unreadable.append(
                f"{state.shard.path}: {rows} rows not read (the warning above says why)"
            )


def _write(state: ShardState, summary: Summary, spec: JobSpec, model: str) -> None:
    if state.store.stats_path.exists():
        return
    info = {"input": str(state.shard.path), "model": model, "task": spec.task}
    stats = state.store.finish(state.rows, state.total, info)
    summary.shards_done += 1
    summary.errors += stats["errors"]
