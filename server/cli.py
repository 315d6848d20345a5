"""`blipserve [serve]`: start the server (flags win over BLIPSERVE_* environment variables and --config
files). `blipserve caption|vqa IMAGE... --url URL`: the client."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

from pydantic import ValidationError

from .logs import configure as configure_logging
from .logs import exit_now
from .memory import keep_freed_memory
from .settings import VERSION, WORKER_ENV, ConfigError, Settings, load_settings, worker_spec
from .startup import StartupError, bind, check, describe_settings_error

log = logging.getLogger("blipserve")


DESCRIPTION = """BLIP-2 inference server.

commands:
  blipserve [serve] [options]               start the server (this command; the default)
  blipserve caption IMAGE... [--url URL]    caption image files or folders with a running server
  blipserve vqa IMAGE... --question Q       ask a question about images (see blipserve vqa --help)
  blipserve batch INPUT --output OUT        caption a dataset, resumably (see blipserve batch --help)
  blipserve help [caption|vqa|batch]        this help, or another command's

Every option is also an environment variable BLIPSERVE_<NAME> (e.g. BLIPSERVE_MAX_QUEUE=512) and a key of a
--config file; flags win over the environment, which wins over the file."""


SHORT_FLAGS = {"data_parallel_size": ("--dp",)}


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _default(field: Any) -> str:
    value = field.default if field.default_factory is None else field.default_factory()
    if value is None or value == []:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """The mistake in a line, not argparse's whole usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n(blipserve --help lists every option)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="blipserve",
        usage="blipserve [serve] [options]  |  blipserve caption|vqa IMAGE... [options]  |  blipserve batch ...",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"blipserve {VERSION}")
    ap.add_argument("--config", help="preset name in configs/ (e.g. blip2-opt-2.7b) or a YAML file")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name.replace('_', ' ')} (default: {_default(field)})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        annotation = field.annotation
        if annotation in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction  # --cuda-graphs / --no-cuda-graphs
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        elif annotation in (int, float):
            kwargs["type"] = annotation
        elif str(annotation).startswith("list"):
            kwargs["type"], kwargs["metavar"] = _comma_list, "A,B"
        ap.add_argument(flag, *SHORT_FLAGS.get(name, ()), **kwargs)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"]:  # `blipserve help [caption|vqa|batch|serve]`
        commands = (["caption"], ["vqa"], ["batch"], ["serve"])
        argv = [*argv[1:2], "--help"] if argv[1:2] in commands else ["--help"]
    if argv[:1] in (["caption"], ["vqa"]):
        from .client import run_client

        sys.exit(run_client(argv[0], argv[1:]))
    if argv[:1] == ["batch"]:
        from .batch.cli import run_batch

        sys.exit(run_batch(argv[1:]))
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    ap = _parser()
    args = vars(ap.parse_args(argv))
    try:
        settings = load_settings(args.pop("config"), **args)
    except (FileNotFoundError, ConfigError) as exc:  # an unknown --config preset, a file that is not one
        ap.error(str(exc))
    except ValidationError as exc:
        ap.error(describe_settings_error(exc))
    configure_logging(settings.log_level, settings.log_format)
    try:
        listener = bind(settings.host, settings.port)  # first: a port in use is found in a second
        if settings.data_parallel_size > 1 and settings.engine == "process":
            from batching.engine_group import plan_devices

            plan_devices(settings)  # one device per engine, enough GPUs: said before anything starts
        root = check(settings)
    except ValueError as exc:
        ap.error(str(exc))
    except StartupError as exc:
        if settings.log_level.lower() == "debug":
            log.exception("start-up check failed")
        ap.error(str(exc))
    # The server has drained and the engine process is gone: leave without the interpreter's teardown,
    # whose last garbage collection costs seconds of CPU on a busy host (docker stop's 10 s count).
    exit_now(serve(settings, root, listener))


def serve(settings: Settings, root: Path | None = None, listener: socket.socket | None = None) -> int:
    """Run the server on `listener` (bound to --host/--port when not given) until SIGTERM / Ctrl-C: it
    answers at once, /ready turning 200 once the model is loaded. The exit status is 1 if the engine
    process died (with --dp: one engine died --engine-restart-limit times within the window; or, with
    `engine: thread`, the model could not be loaded)."""
    import uvicorn

    from .app import create_app

    listener = listener or bind(settings.host, settings.port)
    scheme = "https" if settings.ssl_certfile else "http"
    log.info("listening on %s://%s:%d (ready once the model is loaded)", scheme, *listener.getsockname()[:2])
    options = uvicorn_options(settings)
    if settings.engine == "thread":
        failed = threading.Event()

        def on_start_failure() -> None:
            failed.set()
            os.kill(os.getpid(), signal.SIGTERM)

        # uvicorn re-raises the SIGTERM / SIGINT it handled once its drain (the engine's too: the app's
        # lifespan) is over; Python's default action would end the process with 128 + the signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda sig, frame: None)
        _run(uvicorn.Config(create_app(settings, on_start_failure=on_start_failure), **options), listener)
        return 1 if failed.is_set() else 0
    import torch

    from batching.engine_group import EngineGroup
    from batching.engine_process import EngineProcess

    torch.set_num_threads(1)  # this process decodes images; the engine process does the tensor maths
    keep_freed_memory()  # image buffers stay for the next request (server/memory.py)
    died = threading.Event()
    stopping = threading.Event()

    def on_exit(code: int | None) -> None:
        if stopping.is_set():
            return
        log.error("the engine process exited (status %s): shutting down for a restart", code)
        died.set()
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: stop accepting, answer what is open

    if settings.data_parallel_size > 1:  # a dead engine is restarted; only a restart loop ends the server
        owner = EngineGroup(settings, root, on_fatal=lambda index, code: on_exit(code))
        handle = owner.start()
    else:
        owner = EngineProcess(settings, root)
        handle = owner.start()

    def on_signal(sig: int, frame: object) -> None:
        # uvicorn re-raises the SIGTERM / SIGINT it has handled once its drain is over; it must not end
        # this process before the engine's own drain below. A signal during that drain ends it at once.
        if stopping.is_set():
            os._exit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if isinstance(owner, EngineProcess):
        owner.watch(on_exit)
    try:
        if settings.api_workers == 1:
            _run(uvicorn.Config(create_app(settings, engine=handle), **options), listener)
        else:
            os.environ[WORKER_ENV] = worker_spec(settings, handle)
            app = "server.app:worker_app"
            _run(uvicorn.Config(app, factory=True, workers=settings.api_workers, **options), listener)
    finally:
        stopping.set()
        owner.stop(settings.graceful_timeout_s)  # the HTTP side has drained; now the engine
    return 1 if died.is_set() else 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config's keywords for `settings` (the app and the socket come apart)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ssl_keyfile": settings.ssl_keyfile,
        "ssl_certfile": settings.ssl_certfile,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.graceful_timeout_s),
        # Longer than clients' usual pool idle time, so the server rarely closes a connection being reused.
        "timeout_keep_alive": 75,
        "access_log": False,  # ours (server.app.Observe) carries the request id
        "log_config": None,  # uvicorn's own lines go through our handler too (JSON when asked)
    }


def _run(config: Any, listener: socket.socket) -> None:
    """uvicorn on our bound socket: one server here, or `config.workers` processes sharing it."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[listener]).run()
        else:
            uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
