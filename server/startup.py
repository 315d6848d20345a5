"""Start-up mistakes caught before anything starts, each told in a line or two (exit status 2)."""

from __future__ import annotations

import re
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
        name = "--" + "-".join(str(x) for x in error.get("loc", ())).replace("_", "-")
        given = error.get("input")
        ctx = error.get("ctx") or {}
        if error.get("type") == "literal_error":
            expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
            lines.append(f"{name} {given}: expected one of {expected}")
        elif error.get("type") == "extra_forbidden":
            lines.append(f"{name}: no such setting")
        else:
            lines.append(f"{name} {given}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(lines)


def check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise StartupError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise StartupError(
            f"--device {device}: no CUDA device is visible (torch {torch.__version__} is {build}); "
            "use --device cpu, or install a CUDA build of torch on a GPU host"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise StartupError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def check_model(model: str) -> Path | None:
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
            root = resolve_checkpoint(model)
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


def check(settings: Settings) -> Path | None:
    """Every start-up check; returns the checkpoint's local directory (None for tiny-random)."""
    check_device(settings.device)
    if settings.otlp_traces_endpoint:
        problem = endpoint_problem(settings.otlp_traces_endpoint)
        if problem or not sdk_available():
            raise StartupError(problem or MISSING_SDK)
    return check_model(settings.model)
