"""`blipserve [serve]`: start the server (flags win over BLIPSERVE_* environment variables and --config
files). `blipserve caption|vqa IMAGE... --url URL`: the client."""

from __future__ import annotations

import argparse
import sys

from .logs import configure as configure_logging
from .settings import Settings, load_settings


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

    import uvicorn

    from .app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        # Longer than clients' usual pool idle time, so the server rarely closes a connection being reused.
        timeout_keep_alive=75,
        access_log=False,  # ours (server.app.Observe) carries the request id
        log_config=None,  # uvicorn's own lines go through our handler too (JSON when asked)
    )


if __name__ == "__main__":
    main()
