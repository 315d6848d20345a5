"""Loaded (as `sitecustomize`) by the servers `bench/load.py --model-cpu` starts, of this tree and of a
reference commit alike: the engine's CPU time inside the model, apart from the engine's own host work.

When `model.arch.blip2` is imported, its `encode_images`, `prefill` and `decode` (vision stage, prefill,
decode step: the model's math; both trees have them) are wrapped to add their thread CPU time
(`time.thread_time`, so time the thread waits for a core does not count) to a per-process total. A
daemon thread writes that total, in seconds, to `$BLIPSERVE_MODEL_CPU_DIR/<pid>` every 50 ms;
`bench/load.py` reads the engine processes' files before and after each level. Engine CPU minus model
CPU is the engine's host CPU: scheduler, sampler, I/O, messages.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from pathlib import Path

_TARGET = "model.arch.blip2"
_METHODS = ("encode_images", "prefill", "decode")


class _Total:
    """The process's model CPU seconds, and the thread that writes them out (started on first use)."""

    def __init__(self, folder: Path):
        self.folder, self.seconds, self.writer = folder, 0.0, None
        self.depth = 0  # wrapped calls under way (the engine calls the model from one thread)

    def add(self, seconds: float) -> None:
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


def _timed(fn, total: _Total):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if total.depth:  # inside another wrapped call: that one counts the time
            return fn(*args, **kwargs)
        total.depth += 1
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            total.depth -= 1
            total.add(time.thread_time() - start)

    return wrapper


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `model.arch.blip2` as usual, then wraps its classes' model methods once it has run."""

    def __init__(self, total: _Total):
        self.total = total

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run, total = spec.loader.exec_module, self.total

        def exec_module(module):
            run(module)
            # Plain methods of the classes defined there (not an imported class's classmethods);
            # the top-level calls only: a wrapped method that calls another is counted once.
            for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == _TARGET]:
                for m in _METHODS:
                    if callable(fn := vars(cls).get(m)):
                        setattr(cls, m, _timed(fn, total))

        spec.loader.exec_module = exec_module
        return spec


if folder := os.environ.get("BLIPSERVE_MODEL_CPU_DIR"):
    sys.meta_path.insert(0, _Finder(_Total(Path(folder))))
