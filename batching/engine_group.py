"""Data parallel (--dp N): N engine processes, one per device, started, restarted and stopped together.

The server's main process owns the group. Each engine is an `EngineProcess` with its own model, KV cache,
scheduler and queue, listening on `engine-INDEX.sock` in the group's working directory; a CUDA engine's
child sees only its GPU (`CUDA_VISIBLE_DEVICES`, as vLLM's `CoreEngineProcManager` does). An engine
that dies is started again on the same device and address (the HTTP processes' sockets reconnect by
themselves); `--engine-restart-limit` deaths of one engine within `--engine-restart-window-s` are a
restart loop, which ends the server (`on_fatal`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from server.settings import Settings

from .engine_process import EngineHandle, EngineProcess, checkpoint_root, new_workdir

log = logging.getLogger(__name__)


def plan_devices(settings: Settings, cuda_count: int | None = None) -> list[str]:
    """Each engine's device: --devices as given (one per engine), else cuda:0..N-1 when CUDA is present
    (or asked for with --device cuda), else "cpu" N times. Raises ValueError when --devices does not name
    one device per engine, or there are fewer GPUs than engines."""
    n = settings.data_parallel_size
    if settings.devices:
        if len(settings.devices) != n:
            raise ValueError(
                f"--devices names {len(settings.devices)} devices for --dp {n}: give one per engine"
            )
        return list(settings.devices)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    wants_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and count > 0)
    if not wants_cuda:
        return ["cpu"] * n
    if count < n:
        raise ValueError(f"--dp {n} needs {n} GPUs, {count} found; name them with --devices (may repeat)")
    return [f"cuda:{i}" for i in range(n)]


def engine_settings(settings: Settings, device: str) -> tuple[Settings, dict[str, str]]:
    """One engine's settings and extra environment: a CUDA engine sees its GPU alone (as cuda:0); CPU
    engines share the cores (--engine-threads each, else an equal share of what the HTTP processes leave)."""
    if device.startswith("cuda"):
        gpu = device.partition(":")[2] or "0"
        return settings.model_copy(update={"device": "cuda:0"}), {"CUDA_VISIBLE_DEVICES": gpu}
    threads = settings.engine_threads or max(
        1, ((os.cpu_count() or 1) - settings.api_workers) // settings.data_parallel_size
    )
    return settings.model_copy(update={"device": device, "engine_threads": threads}), {}


class EngineGroup:
    """N `EngineProcess`es sharing a working directory and checkpoint; restarts the ones that die."""

    def __init__(
        self,
        settings: Settings,
        root: Path | None = None,
        target: Callable[[Settings, str, str], None] | None = None,
        on_fatal: Callable[[int, int | None], None] = lambda index, code: None,
    ):
        """`target`: as `EngineProcess`'s (tests stand engines in). `on_fatal(index, exitcode)` runs
        (from a reaper thread) when an engine dies once too often: the server must end."""
        self.settings = settings
        self.on_fatal = on_fatal
        self.workdir = new_workdir()
        root = checkpoint_root(settings, self.workdir, root)
        self.engines = []
        for i, device in enumerate(plan_devices(settings)):
            child, env = engine_settings(settings, device)
            self.engines.append(EngineProcess(child, root, target, i, self.workdir, env, device))
        self.stopping = threading.Event()
        self._deaths = [deque() for _ in self.engines]

    def start(self) -> list[EngineHandle]:
        for engine in self.engines:
            engine.start()
            engine.watch(lambda code, i=engine.index: self._on_exit(i, code))
        return self.handles

    @property
    def handles(self) -> list[EngineHandle]:
        return [e.handle for e in self.engines]

    def _on_exit(self, index: int, code: int | None) -> None:
        if self.stopping.is_set():
            return
        now = time.monotonic()
        deaths = self._deaths[index]
        deaths.append(now)
        while deaths and deaths[0] < now - self.settings.engine_restart_window_s:
            deaths.popleft()
        if len(deaths) >= self.settings.engine_restart_limit:
            log.error(
                "engine %d exited (status %s), %d times within %.0fs: a restart loop; the server ends",
                index,
                code,
                len(deaths),
                self.settings.engine_restart_window_s,
            )
            self.on_fatal(index, code)
            return
        log.error("engine %d exited (status %s); restarting it, the others serve meanwhile", index, code)
        self.engines[index].start()

    def stop(self, timeout_s: float) -> None:
        """Drain every engine at once (each finishes what it accepted), then remove the working directory."""
        self.stopping.set()
        threads = [threading.Thread(target=e.stop, args=(timeout_s,)) for e in self.engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shutil.rmtree(self.workdir, ignore_errors=True)
