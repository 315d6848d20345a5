"""`blipserve batch INPUT --output OUT`: caption (or question) a dataset, resumably.

Exit status: 0 every row answered (or stopped by SIGTERM / Ctrl-C after writing the rows in flight: rerun
the same command to resume); 1 the job finished and some rows failed (their `error` says why;
`--retry-errors` redoes them); 2 the command line, the input, the output folder or the model is wrong
(nothing was answered).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

from pydantic import ValidationError

from ..errors import ApiError
from ..logs import configure as configure_logging
from ..schemas import GenerationParams
from ..settings import Settings, load_settings
from ..startup import StartupError, check, describe_settings_error
from .backends import BATCH_PRIORITY, JobSpec
from .job import Options, Summary, check_job_file, plan, run
from .sources import Columns, InputError, find_shards

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
        "input", help="image folder, .tar shard(s) or brace pattern, .parquet file(s), OpenAI .jsonl"
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
    ap.add_argument("--shard-size", type=int, default=10_000, help="image folders: images per output shard")
    ap.add_argument(
        "--concurrency", type=int, help="rows in flight (default: 2 x --max-running-seqs; --url: 16)"
    )
    ap.add_argument("--retry-errors", action="store_true", help="redo the rows that failed in earlier runs")
    ap.add_argument(
        "--progress", choices=("bar", "plain", "none"), default="bar", help="plain: a line every 5 s"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress, no summary (= --progress none)")
    ap.add_argument("--url", help="send the rows to a running server instead of loading the model here")
    ap.add_argument("--retries", type=int, default=8, help="--url: retries of a 429 / 503 / lost connection")
    ap.add_argument(
        "--priority", type=int, default=BATCH_PRIORITY, help="request priority (lower runs later)"
    )
    ap.add_argument("--ray", metavar="auto|ADDRESS", help="run as a Ray Data pipeline on this Ray cluster")
    ap.add_argument("--ray-actors", type=int, help="--ray: engines (default: the cluster's GPUs, else 1)")
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
        from ..engine_group import plan_devices

        try:
            plan_devices(settings)  # one device per engine, enough GPUs: said before anything starts
        except ValueError as exc:
            ap.error(str(exc))
    elif settings.devices:
        ap.error("--devices names the devices of --dp N engines (one engine: --device)")
    if args.task == "vqa" and not (args.question or args.question_column):
        ap.error("--task vqa needs --question or --question-column")
    if args.task == "caption" and (args.question or args.question_column):
        ap.error("--question is for --task vqa")
    spec = JobSpec(args.task, args.prompt, args.question, params, args.priority)
    try:
        spec.body(args.question or "?")  # the generation options, checked as the HTTP API checks them
    except ApiError as exc:
        ap.error(exc.message)
    return spec, settings


def run_batch(argv: list[str]) -> int:
    """`blipserve batch ...`; returns the exit status (see the module docstring)."""
    ap = parser()
    args = ap.parse_args(argv)
    spec, settings = spec_and_settings(args, ap)
    # Warnings and errors only, unless asked: no start-up chatter, no access line per row.
    configure_logging(settings.log_level if args.log_level else "warning", "text")
    columns = Columns(args.image_column, args.key_column, args.question_column)
    engines = settings.data_parallel_size  # --max-running-seqs is per engine
    concurrency = args.concurrency or (16 if args.url else 2 * settings.max_running_seqs * engines)
    settings = settings.model_copy(update={"max_queue": max(settings.max_queue, concurrency)})
    progress = "none" if args.quiet else args.progress
    opts = Options(args.output, args.format, columns, concurrency, args.retry_errors, progress)
    try:
        shards = find_shards(args.input, args.shard_size)
        job = {"task": spec.task, "prompt": spec.prompt, "question": spec.question, "params": spec.params}
        job.update(columns=vars(columns), format=args.format, input=os.path.abspath(args.input))
        single = opts.output.suffix == ".jsonl" and len(shards) == 1 and shards[0].kind == "openai"
        check_job_file(opts.output.parent if single else opts.output, job)
        states, summary = plan(shards, opts, spec)
    except (InputError, ValueError, OSError) as exc:
        ap.error(str(exc))
    if args.ray:
        from .ray_job import run_ray

        summary = run_ray(args.ray, args.ray_actors, settings, spec, opts, states, summary)
    else:
        try:
            summary = asyncio.run(_run_here(args.url, args.retries, settings, spec, opts, states, summary))
        except (StartupError, ApiError) as exc:
            ap.error(str(exc))
        except InputError as exc:
            print(f"blipserve batch: error: {exc}", file=sys.stderr)
            return 2
    return 0 if summary.interrupted or summary.errors == 0 else 1


async def _run_here(url: str | None, retries: int, settings: Settings, spec: JobSpec, opts: Options,
                    states: list, summary: Summary) -> Summary:  # fmt: skip
    """The job with the model in this process, or against the server at `url`."""
    from .backends import LocalBackend, RemoteBackend

    stop = asyncio.Event()
    _on_signals(stop)  # first: a signal while --dp engines start stops the job, which stops them
    if url:
        backend: Any = RemoteBackend(url, settings, spec, retries)
    else:
        check(settings)
        backend = await asyncio.to_thread(LocalBackend, settings, spec)
    try:
        await backend.start()
        return await run(backend, spec, opts, states, summary, stop)
    finally:
        await backend.close()


def _on_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT: finish the rows in flight, write them, exit 0; a second one: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(sig: int) -> None:
        if stop.is_set():
            os._exit(128 + sig)
        print(f"blipserve batch: {signal.Signals(sig).name}: finishing the rows in flight", file=sys.stderr)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
