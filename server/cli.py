"""`blipserve [serve]`: start the server (flags win over BLIPSERVE_* environment variables and --config
files). `blipserve caption|vqa IMAGE... --url URL`: the client."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .logs import configure as configure_logging
from .settings import WORKER_ENV, Settings, load_settings, worker_spec

log = logging.getLogger("blipserve")


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blipserve", description="BLIP-2 inference server")
    ap.add_argument("--config", help="preset name in configs/ (e.g. blip2-opt-2.7b) or a YAML file")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation in (int, float):
            kind = field.annotation
        elif str(field.annotation).startswith("list"):
            kind = _comma_list
        else:
            kind = str
        ap.add_argument(
            flag, dest=name, type=kind, default=None, help=field.description or f"default: {field.default}"
        )
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["caption"], ["vqa"]):
        from .client import run_client

        sys.exit(run_client(argv[0], argv[1:]))
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = vars(_parser().parse_args(argv))
    settings = load_settings(args.pop("config"), **args)
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(serve(settings))


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM / Ctrl-C; the exit status is 1 if the engine process died."""
    import uvicorn

    from .app import create_app

    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.graceful_timeout_s),
        # Longer than clients' usual pool idle time, so the server rarely closes a connection being reused.
        "timeout_keep_alive": 75,
        "access_log": False,  # ours (server.app.Observe) carries the request id
        "log_config": None,  # uvicorn's own lines go through our handler too (JSON when asked)
    }
    if settings.engine == "thread":
        uvicorn.run(create_app(settings), **options)
        return 0
    import torch

    from .engine_process import EngineProcess

    torch.set_num_threads(1)  # this process decodes images; the engine process does the tensor maths
    owner = EngineProcess(settings)
    handle = owner.start()
    died = threading.Event()
    stopping = threading.Event()

    def on_exit(code: int | None) -> None:
        if stopping.is_set():
            return
        log.error("the engine process exited (status %s): shutting down for a restart", code)
        died.set()
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: stop accepting, answer what is open

    def on_signal(sig: int, frame: object) -> None:
        # uvicorn re-raises the SIGTERM / SIGINT it has handled once its drain is over; it must not end
        # this process before the engine's own drain below. A signal during that drain ends it at once.
        if stopping.is_set():
            os._exit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    owner.watch(on_exit)
    try:
        if settings.api_workers == 1:
            uvicorn.run(create_app(settings, engine=handle), **options)
        else:
            os.environ[WORKER_ENV] = worker_spec(settings, handle)
            uvicorn.run("server.app:worker_app", factory=True, workers=settings.api_workers, **options)
    finally:
        stopping.set()
        owner.stop(settings.graceful_timeout_s)  # the HTTP side has drained; now the engine
    return 1 if died.is_set() else 0


if __name__ == "__main__":
    main()
