"""The engine's life as the HTTP process sees it: built from the settings, started, warmed up, healthy,
its metrics, shut down. `EngineLifecycle` holds the engine client and the request rules' `Frontend`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from batching import EngineCore, Scheduler
from batching.client import EngineClient, InprocClient
from batching.dp_client import DataParallelClient
from batching.engine_process import (
    EngineHandle,
    EngineProcess,
    build_engine_core,
    load_engine,
    pid_alive,
)
from batching.metrics import Metrics
from batching.process_client import ProcessClient
from model.decoding.generation import SamplingParams
from model.frontend import Frontend
from model.runtime.quant import weight_bytes
from model.runtime.runner import ModelRunner

from .settings import Settings


class EngineLifecycle:
    """The engine client (`client`) and the request rules (`engine`: a `Frontend`, with tokenizer, image
    processor and prompt rules and no model in process mode; the `Blip2Engine` with `engine: thread`),
    from build to shutdown. The engine runs in this process (`engine: thread`) or in an engine process of
    its own (`engine: process`, the default); `owner` is the engine process (or --dp group) this process
    started, stopped with it. After `start`: `device`, `dtype`, `weight_bytes` and `raw_pixels`."""

    def __init__(
        self,
        settings: Settings,
        engine: Frontend,
        client: EngineClient,
        owner: EngineProcess | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.client = client
        self.owner = owner
        self.ready = False
        self.created = int(time.time())  # /v1/models: when this model was loaded
        self.device = self.dtype = ""
        self.weight_bytes = 0

    @classmethod
    def build(
        cls, settings: Settings, handle: EngineHandle | list[EngineHandle] | None = None
    ) -> EngineLifecycle:
        """Load the model here (`engine: thread`), or start an engine process (or use `handle`'s; a list
        of handles: --dp engines, each request to the least loaded). Raises what loading the model or
        starting the engine process raises (StartupError, OSError...)."""
        if settings.engine == "thread" and handle is None:
            engine = load_engine(settings)
            metrics = Metrics()
            return cls(settings, engine, InprocClient(build_engine_core(settings, engine, metrics), metrics))
        owner = None
        if handle is None and settings.data_parallel_size > 1:
            from batching.engine_group import EngineGroup

            owner = EngineGroup(settings)
            handle = owner.start()
        if isinstance(handle, list) and len(handle) > 1:
            frontend = Frontend.from_dir(Path(handle[0].root), handle[0].model_id)
            client = DataParallelClient(handle, settings.dp_routing, settings.min_ready_engines)
            return cls(settings, frontend, client, owner)
        if isinstance(handle, list):
            handle = handle[0]
        if handle is None:
            owner = EngineProcess(settings)
            handle = owner.start()
        alive = owner.alive if owner is not None else (lambda: pid_alive(handle.pid))
        frontend = Frontend.from_dir(Path(handle.root), handle.model_id)
        return cls(settings, frontend, ProcessClient(handle.address, alive), owner)

    @property
    def remote(self) -> bool:
        """The engine runs in engine process(es), not on a thread of this process."""
        return isinstance(self.client, ProcessClient | DataParallelClient)

    @property
    def loop(self) -> EngineCore:
        """The in-process engine loop (`engine: thread`), for tests that reach into it."""
        return self.client.loop

    @property
    def runner(self) -> ModelRunner:
        """The in-process engine's model runner (`engine: thread`)."""
        return self.client.loop.runner

    @property
    def scheduler(self) -> Scheduler:
        """The in-process engine's scheduler (`engine: thread`)."""
        return self.client.loop.scheduler

    @property
    def raw_pixels(self) -> bool:
        """The engine takes images as resized uint8 pixels and normalises them itself (known after
        `start`): `--raw-pixels` if set, else a CUDA engine does (a quarter of the bytes to pass and copy
        up, normalised on the device); a CPU engine would only do what this process does."""
        raw = self.settings.raw_pixels
        return self.device.startswith("cuda") if raw is None else raw

    @property
    def healthy(self) -> bool:
        """The engine (thread, or every process it needs) is alive."""
        return self.client.healthy

    async def start(self) -> None:
        """Capture the decode graphs and start the engine thread, or wait for the engine process(es)."""
        if self.remote:
            info = await self.client.connect()
            self.device, self.dtype, self.weight_bytes = info.device, info.dtype, info.weight_bytes
        else:
            await asyncio.to_thread(self.client.loop.runner.prepare)
            self.client.start()
            self.device, self.dtype = str(self.engine.device), str(self.engine.dtype).removeprefix("torch.")
            self.weight_bytes = weight_bytes(self.engine.model)

    async def warm_up(self) -> None:
        """One request through every stage before taking traffic (allocations, kernels, lazy init);
        `ready` once it is through."""
        side = self.engine.image_processor
        pixels = torch.zeros(3, side.height, side.width)
        if "match" in self.engine.tasks:
            request = self.engine.retrieval_request("match", pixels, "warmup", ["warm up"])
        else:
            params = SamplingParams(max_new_tokens=2, num_beams=min(2, self.settings.max_running_seqs))
            request = self.engine.request(pixels, "warmup", "warm up", params)
        await self.client.submit(request)  # through the serving path itself: client, loop, runner, cache
        self.ready = True
        self._ready_gauge(1)

    def _ready_gauge(self, value: int) -> None:
        """`blipserve_ready` of an in-process engine (`--engine thread`); an engine process sets its own."""
        metrics = getattr(self.client, "metrics", None)
        if not self.remote and metrics is not None:
            metrics.ready.set(value)

    async def shutdown(self) -> None:
        """Finish every accepted request, then stop the engine (thread, or the process we started)."""
        self.ready = False
        self._ready_gauge(0)
        timeout = self.settings.graceful_timeout_s
        if self.remote:
            await self.client.close()  # first: the engine's exit below is no death to report
            if self.owner is not None:
                await asyncio.to_thread(self.owner.stop, timeout)
        else:
            await asyncio.to_thread(self.client.shutdown, timeout)

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP response in the engine's metrics (`endpoint`: the route's template)."""
        self.client.record_http(endpoint, status, seconds)

    async def render_metrics(self) -> bytes:
        """The Prometheus exposition of /metrics (the engines' series merged with --dp)."""
        return await self.client.metrics_text()
