"""`blipserve batch INPUT --output OUT`: caption (or question) a dataset, resumably.

Exit status: 0 every row answered (or stopped by SIGTERM / Ctrl-C after writing the rows in flight: rerun
the same command to resume); 1 the job finished and some rows failed (their `error` says why;
`--retry-errors` redoes them) or some shard files could not be read (named on stderr; a rerun tries them
again); 2 the command line, the input, the output folder or the model is wrong (nothing was answered),
or the outputs could not be written; 3 the server of `--url` could not be reached through every retry
(the job stopped as on SIGTERM: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import ValidationError

from ..errors import ApiError
from ..logs import configure as configure_logging
from ..schemas import GenerationParams
from ..settings import Settings, load_settings
from ..startup import StartupError, check, describe_settings_error
from .backends import BATCH_PRIORITY, JobSpec
from .job import Options, Summary, check_job_file, check_output, plan, run
from .sources import Columns, InputError, check_columns, find_shards

log = logging.getLogger("blipserve")

# The server's settings that concern a batch job (model, engine, limits, URL fetching, prompting).
SETTINGS = (
    "model", "device", "dtype", "quantize", "engine_threads", "max_batch_images", "background_vision",
    "overlap", "raw_pixels", "qformer_precision", "max_running_seqs", "max_queue", "embedding_cache_mb",
    "cuda_graphs", "decode_kv_step", "max_new_tokens_limit", "default_max_new_tokens", "max_prompt_tokens",
    "max_beams", "max_n", "max_image_pixels", "max_body_mb", "request_timeout_s", "allow_image_urls",
    "image_url_allowlist", "image_url_timeout_s", "vqa_template", "default_num_beams", "vqa_max_new_tokens",
    "api_key", "log_level", "data_parallel_size", "devices", "dp_routing",
)  # fmt: skip
SHORT_FLAGS = {"data_parallel_size": ("--dp",)}  # as the server's
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
BATCH_TIMEOUT_S = 3600.0  # request_timeout_s unless given: a row may wait behind a whole engine's batch

EXAMPLES = """examples:
  blipserve batch photos/ -o captions/                          # a folder of images -> captions/*.parquet
  blipserve batch 'shards/{00000..00099}.tar' -o out/ --config blip2-opt-2.7b
  blipserve batch laion.parquet -o out/ --image-column url --allow-image-urls --format jsonl
  blipserve batch images/ -o out/ --task vqa --question "what is in the picture?"
  blipserve batch requests.jsonl -o results.jsonl              # an OpenAI batch file
  blipserve batch shards/ -o out/ --url http://gpu-host:8000 --concurrency 32
  blipserve batch shards/ -o out/ --dp 4                         # 4 engine processes, one per GPU
  blipserve batch shards/ -o out/ --ray auto                    # a Ray Data pipeline, one engine per GPU

""" + (__doc__ or "").split("\n\n", 1)[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(blipserve batch --help lists every option)\n")


def _at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low` (argparse turns the ValueError into one usage line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def _http_url(text: str) -> str:
    """argparse type: an http(s)://host[:port] base URL."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected http://HOST:PORT or https://HOST (a server's URL)"
        )
    return text


def _add_model_flags(ap: argparse.ArgumentParser, fields: dict[str, Any], names: tuple[str, ...]) -> None:
    """Flags for pydantic fields, typed as the server's flags are (None = not given)."""
    for name in names:
        field = fields[name]
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": None,
            "help": (field.description or "").replace("%", "%%"),
        }
        annotation = field.annotation
        if annotation in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        elif str(annotation).startswith("list"):
            kwargs["type"] = lambda v: [s.strip() for s in v.split(",") if s.strip()]
        elif annotation in (int, float, int | None, float | None):
            kwargs["type"] = int if "int" in str(annotation) else float
        ap.add_argument("--" + name.replace("_", "-"), *SHORT_FLAGS.get(name, ()), **kwargs)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="blipserve batch",
        description="Caption or question every image of a dataset; outputs one file per input shard. "
        "A rerun of the same command resumes: finished shards and rows are skipped.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "input",
        nargs="+",
        help="image folder, .tar shard(s) or brace pattern, .parquet file(s), OpenAI .jsonl; several files "
        "(shards/*.tar, as the shell expands it) are the shards of one job",
    )
    ap.add_argument(
        "-o", "--output", required=True, type=Path, help="output folder (or .jsonl for one OpenAI batch file)"
    )
    ap.add_argument("--task", choices=("caption", "vqa"), default="caption")
    ap.add_argument("--prompt", help="caption: text for the caption to continue")
    ap.add_argument("--question", help="vqa: the question asked about every image")
    ap.add_argument(
        "--question-column", help="vqa: parquet column (webdataset: .json field) with each row's question"
    )
    ap.add_argument(
        "--image-column",
        help="parquet: image bytes, path or URL column (default: jpg, png, webp, image, ...)",
    )
    ap.add_argument(
        "--key-column", help="parquet: the rows' key (default: 'key' if present, else the row number)"
    )
    ap.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="dataset output files")
    ap.add_argument(
        "--shard-size", type=_at_least(1), default=10_000, help="image folders: images per output shard"
    )
    ap.add_argument(
        "--concurrency", type=_at_least(1), help="rows in flight (default: 2 x --max-running-seqs; --url: 16)"
    )
    ap.add_argument("--retry-errors", action="store_true", help="redo the rows that failed in earlier runs")
    ap.add_argument(
        "--progress",
        choices=("bar", "plain", "none"),
        help="bar (default on a terminal), plain (a line every 5 s; default when stderr is a file or pipe)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress, no summary (= --progress none)")
    ap.add_argument(
        "--url", type=_http_url, help="send the rows to a running server instead of loading the model here"
    )
    ap.add_argument(
        "--retries", type=_at_least(0), default=8, help="--url: retries of a 429 / 503 / lost connection"
    )
    ap.add_argument(
        "--priority", type=int, default=BATCH_PRIORITY, help="request priority (lower runs later)"
    )
    ap.add_argument("--ray", metavar="auto|ADDRESS", help="run as a Ray Data pipeline on this Ray cluster")
    ap.add_argument(
        "--ray-actors", type=_at_least(1), help="--ray: engines (default: the cluster's GPUs, else 1)"
    )
    ap.add_argument("--config", help="preset name in configs/ (e.g. blip2-opt-2.7b) or a YAML file")
    _add_model_flags(ap, Settings.model_fields, SETTINGS)
    params = tuple(n for n in GenerationParams.model_fields if n not in ("stream", "stop"))
    _add_model_flags(ap, GenerationParams.model_fields, params)
    ap.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    return ap


def spec_and_settings(args: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[JobSpec, Settings]:
    flags = {name: getattr(args, name) for name in SETTINGS}
    flags["request_timeout_s"] = flags["request_timeout_s"] or BATCH_TIMEOUT_S
    try:
        settings = load_settings(args.config, **flags)
    except FileNotFoundError as exc:
        ap.error(str(exc))
    except ValidationError as exc:
        ap.error(describe_settings_error(exc))
    names = [n for n in GenerationParams.model_fields if n != "stream"]
    params = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if settings.data_parallel_size > 1 and (args.url or args.ray):
        ap.error("--dp is for the model in this process (--url: the server's own --dp; --ray: --ray-actors)")
    if settings.data_parallel_size > 1:
        from batching.engine_group import plan_devices

        try:
            plan_devices(settings)  # one device per engine, enough GPUs: said before anything starts
        except ValueError as exc:
            ap.error(str(exc))
    elif settings.devices:
        ap.error("--devices names the devices of --dp N engines (one engine: --device)")
    if args.task == "vqa" and not (args.question or args.question_column):
        ap.error("--task vqa needs --question or --question-column")
    if args.task == "caption" and (args.question or args.question_column):
        ap.error(f"{'--question' if args.question else '--question-column'} is for --task vqa")
    spec = JobSpec(args.task, args.prompt, args.question, params, args.priority)
    try:
        spec.body(args.question or "?")  # the generation options, checked as the HTTP API checks them
    except ApiError as exc:
        ap.error(exc.message)
    return spec, settings


def run_batch(argv: list[str]) -> int:
    """`blipserve batch ...`; returns the exit status (see the module docstring). Until the job runs
    (and after), SIGTERM / SIGINT exit 0 at once, in one line: there is nothing to save."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _run_batch(argv)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _stop_at_once()
    try:
        return _run_batch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_batch(argv: list[str]) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    spec, settings = spec_and_settings(args, ap)
    # Warnings and errors only, unless asked: no start-up chatter, no access line per row.
    configure_logging(settings.log_level if args.log_level else "warning", "text")
    columns = Columns(args.image_column, args.key_column, args.question_column)
    engines = settings.data_parallel_size  # --max-running-seqs is per engine
    concurrency = args.concurrency or (16 if args.url else 2 * settings.max_running_seqs * engines)
    settings = settings.model_copy(update={"max_queue": max(settings.max_queue, concurrency)})
    progress = "none" if args.quiet else args.progress or ("bar" if sys.stderr.isatty() else "plain")
    opts = Options(args.output, args.format, columns, concurrency, args.retry_errors, progress)
    try:
        shards = find_shards(args.input if len(args.input) > 1 else args.input[0], args.shard_size)
        check_columns(shards, columns)
        check_output(shards, opts)
        job = {"task": spec.task, "prompt": spec.prompt, "question": spec.question, "params": spec.params}
        inputs = [os.path.abspath(p) for p in args.input]
        job.update(columns=vars(columns), format=args.format, input=inputs if len(inputs) > 1 else inputs[0])
        if shards[0].kind == "images":  # which files make up each shard
            job["shard_size"] = args.shard_size
        check_job_file(shards, opts, spec, job)
        states, summary = plan(shards, opts, spec)
    except (InputError, ValueError, OSError) as exc:
        ap.error(str(exc))
    if not states:  # every shard finished (or unreadable): no model to load
        if progress != "none":
            print(summary.line(opts.output), file=sys.stderr)
        return summary.status
    try:
        if args.ray:
            from .ray_job import run_ray

            summary = run_ray(args.ray, args.ray_actors, settings, spec, opts, states, summary)
        else:
            summary = asyncio.run(_run_here(args.url, args.retries, settings, spec, opts, states, summary))
    except (StartupError, ApiError) as exc:
        ap.error(str(exc))
    except (InputError, OSError) as exc:  # a shard changed under the job, or the outputs cannot be written
        print(f"blipserve batch: error: {exc}", file=sys.stderr)
        return 2
    return summary.status


def _stop_at_once() -> None:
    """SIGTERM / SIGINT outside the job (loading, starting, stopping): exit 0 at once, in one line."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(sig: int, frame: Any) -> None:
        name = signal.Signals(sig).name
        print(f"blipserve batch: {name}: stopped (no row in flight; rerun the same command)", file=sys.stderr)
        os._exit(0)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


async def _run_here(url: str | None, retries: int, settings: Settings, spec: JobSpec, opts: Options,
                    states: list, summary: Summary) -> Summary:  # fmt: skip
    """The job with the model in this process, or against the server at `url`."""
    from .backends import LocalBackend, RemoteBackend, torch_threads

    stop = asyncio.Event()
    main = threading.current_thread() is threading.main_thread()
    # With --dp, first: a signal while the engines start stops the job, which stops them.
    early = main and not url and settings.data_parallel_size > 1
    if early:
        _on_signals(stop)
    if url:
        backend: Any = RemoteBackend(url, settings, spec, retries)
    else:
        import torch

        check(settings)
        torch.set_num_threads(torch_threads(settings))
        try:
            backend = await asyncio.to_thread(LocalBackend, settings, spec)
        except Exception as exc:  # the model would not load: one line, as the server says it
            raise StartupError(f"cannot load {settings.model}: {type(exc).__name__}: {exc}") from None
    try:
        # The task and generation options against the model and its limits (an OpenAI batch file's
        # lines carry their own, checked each by the routes).
        await backend.start(check=any(state.shard.kind != "openai" for state in states))
        if main and not early:
            _on_signals(stop)
        return await run(backend, spec, opts, states, summary, stop)
    finally:
        if main:
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:  # else asyncio.run's end would put back Python's KeyboardInterrupt
                loop.remove_signal_handler(sig)
            _stop_at_once()
        await backend.close()


def _on_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT: finish the rows in flight, write them, exit 0; a second one: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(sig: int) -> None:
        if stop.is_set():
            os._exit(128 + sig)
        print(f"blipserve batch: {signal.Signals(sig).name}: finishing the rows in flight", file=sys.stderr)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handle, sig)
