"""Start-up mistakes caught before anything starts, each told in a line or two (exit status 2)."""

from __future__ import annotations

import errno
import re
import socket
import ssl
from pathlib import Path

from pydantic import ValidationError

from .settings import Settings
from .tracing import MISSING_SDK, endpoint_problem, sdk_available

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
CHECKPOINT_FILES = "config.json, model*.safetensors, tokenizer.json, preprocessor_config.json"


class StartupError(Exception):
    """A mistake in how the server was started: the message says what and what is expected."""


def describe_settings_error(exc: ValidationError) -> str:
    """pydantic's errors as the flags that caused them ('--dtype fp16: expected one of ...')."""
    lines = []
    for error in exc.errors():
        loc = [str(x) for x in error.get("loc", ()) if not isinstance(x, int)]  # list items: the flag
        name = "--" + "-".join(loc).replace("_", "-")
        given = error.get("input")
        ctx = error.get("ctx") or {}
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a rule across settings: its message names them
            lines.append(message)
        elif error.get("type") == "literal_error":
            expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
            lines.append(f"{name} {given}: expected one of {expected}")
        elif error.get("type") == "extra_forbidden":
            lines.append(f"{name}: no such setting")
        else:
            shown = ",".join(map(str, given)) if isinstance(given, list) else given
            lines.append(f"{name} {shown}: {message}")
    return "; ".join(lines)


def check_device(device: str, flag: str = "--device") -> None:
    """A device this host can use (`flag`: the option that named it, for the message)."""
    if not DEVICE.fullmatch(device):
        raise StartupError(f"{flag} {device}: expected cpu, cuda, cuda:N or auto")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise StartupError(
            f"{flag} {device}: no CUDA device is visible (torch {torch.__version__} is {build}); "
            "use --device cpu, or install a CUDA build of torch on a GPU host"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise StartupError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def check_model(model: str, revision: str | None = None) -> Path | None:
    """The checkpoint's local directory (a hub id is fetched here); None for 'tiny-random'."""
    from model.checkpoint.loader import resolve_checkpoint, weight_files
    from model.engine import TINY_RANDOM

    if model == TINY_RANDOM:
        return None
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StartupError(
                f"--model {model}: is a file; expected a checkpoint directory ({CHECKPOINT_FILES})"
            )
        root = path
    elif model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise StartupError(
            f"--model {model}: no such directory (nor a hub id such as Salesforce/blip2-opt-2.7b)"
        )
    else:
        try:
            root = resolve_checkpoint(model, revision)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StartupError(
                f"--model {model}: cannot fetch it from the Hugging Face hub ({reason})"
            ) from None
    if not (root / "config.json").exists():
        raise StartupError(
            f"--model {model}: not a checkpoint, it has no config.json (expected {CHECKPOINT_FILES})"
        )
    try:
        weight_files(root)
    except FileNotFoundError as exc:
        raise StartupError(f"--model {model}: {exc}") from None
    return root


def bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound (not yet listening: uvicorn listens once it serves). Done
    first, so that a port in use is told in a line before any model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "; another process listens there: stop it or choose another --port"
        why = exc.strerror or str(exc)
        raise StartupError(
            f"--port {port}: cannot listen on {host}:{port} ({why}"
            f"{hint if exc.errno == errno.EADDRINUSE else ''})"
        ) from None
    sock.set_inheritable(True)  # --api-workers N: the HTTP processes serve on this same socket
    return sock


def check_tls(keyfile: str | None, certfile: str | None) -> None:
    """--ssl-keyfile / --ssl-certfile: both readable PEM files that make a key pair."""
    if keyfile is None and certfile is None:
        return
    if certfile is None:
        raise StartupError("--ssl-keyfile needs --ssl-certfile (the certificate of that key)")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise StartupError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"--ssl-certfile {certfile}: cannot load it with its key ({exc})") from None


def check_quantize(quantize: str) -> None:
    """--quantize llm.int8 needs bitsandbytes, an optional extra (`pip install "blipserve[llm-int8]"`)."""
    if quantize != "llm.int8":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise StartupError(
            f"--quantize llm.int8: needs bitsandbytes, which cannot be imported ({exc}); "
            'install it with pip install "blipserve[llm-int8]" (or bitsandbytes>=0.43)'
        ) from None


def check(settings: Settings) -> Path | None:
    """Every start-up check; returns the checkpoint's local directory (None for tiny-random)."""
    check_device(settings.device)
    for device in settings.devices or []:  # --dp's engines, each checked as --device is
        check_device(device, "--devices")
    if settings.otlp_traces_endpoint:
        problem = endpoint_problem(settings.otlp_traces_endpoint)
        if problem or not sdk_available():
            raise StartupError(problem or MISSING_SDK)
    check_tls(settings.ssl_keyfile, settings.ssl_certfile)
    check_quantize(settings.quantize)
    return check_model(settings.model, settings.revision)
