"""Logging setup: plain text, or one JSON object per line (for log shippers)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import NoReturn

# Fields the access log passes with `extra=` and the JSON formatter writes out.
ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "client", "trace_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in ACCESS_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once its logs and stdio are flushed, skipping the interpreter's
    finalisation: its last garbage collection walks every object torch and the app created (seconds of
    CPU on a loaded host, while `docker stop` counts down to SIGKILL), and nothing is left to finalise
    once the caller has drained and closed what it owns."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or None (pythonw)
            stream.flush()
    os._exit(code)
