"""Loaded (as `sitecustomize`) by the servers `bench/load.py --model-cpu` starts, of this tree and of a
reference commit alike: the engine's CPU time inside the model, apart from the engine's own host work.

When `model.arch.blip2` is imported, its classes' `encode_images`, `prefill`, `prefill_static` and `decode`
(vision stage, prefill, decode step: the model's math; both trees have them) are wrapped to add their
calling thread's CPU time (`time.thread_time`: time waiting for a core does not count) to a per-process
total; a wrapped call inside another counts once. A daemon thread writes the total, in seconds, to
`$BLIPSERVE_MODEL_CPU_DIR/<pid>` every 50 ms; `bench/load.py` reads the engine processes' files before and
after each level. Engine CPU minus model CPU is the engine's host CPU: scheduler, sampler, I/O, messages.

What it measures: a CPU engine running eagerly with one torch thread (the default on a 2-core machine).
With more torch threads, their workers' CPU counts as host (the thread clock is the caller's); on CUDA,
graph replays do not call these methods and the math runs on the device. An existing `sitecustomize`
further down `sys.path` still runs.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

_TARGET = "model.arch.blip2"
_METHODS = ("encode_images", "prefill", "prefill_static", "decode")


class _Total:
    """The process's model CPU seconds (summed over threads), and the thread that writes them out."""

    def __init__(self, folder: Path):
        self.folder, self.seconds, self.writer = folder, 0.0, None
        self.lock = threading.Lock()
        self.calls = threading.local()  # `depth`: wrapped calls under way in this thread

    def add(self, seconds: float) -> None:
        with self.lock:
            self.seconds += seconds
            if self.writer is None:
                self.writer = threading.Thread(target=self._write, daemon=True, name="model-cpu")
                self.writer.start()

    def _write(self) -> None:
        path, tmp = self.folder / str(os.getpid()), self.folder / f".{os.getpid()}"
        while True:
            tmp.write_text(repr(self.seconds))
            tmp.replace(path)
            time.sleep(0.05)


def _timed(fn: Callable[..., Any], total: _Total) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(total.calls, "depth", 0)
        if depth:  # inside another wrapped call of this thread: that one counts the time
            return fn(*args, **kwargs)
        total.calls.depth = 1
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            total.calls.depth = 0
            total.add(time.thread_time() - start)

    return wrapper


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `model.arch.blip2` as usual, then wraps its classes' model methods once it has run."""

    def __init__(self, total: _Total):
        self.total = total

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run, total = spec.loader.exec_module, self.total

        def exec_module(module: ModuleType) -> None:
            run(module)
            # Plain methods of the classes defined there (not an imported class's classmethods).
            for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == _TARGET]:
                for m in _METHODS:
                    if callable(fn := vars(cls).get(m)):
                        setattr(cls, m, _timed(fn, total))

        spec.loader.exec_module = exec_module
        return spec


def _chain() -> None:
    """Run the `sitecustomize` this one shadows, if any (a distribution's or an image's own)."""
    here = Path(__file__).resolve().parent
    rest = [p for p in sys.path if Path(p or ".").resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if folder := os.environ.get("BLIPSERVE_MODEL_CPU_DIR"):
    sys.meta_path.insert(0, _Finder(_Total(Path(folder))))
_chain()
