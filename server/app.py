"""The HTTP layer: validate, forward to the engine loop, format. Built by `create_app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from batching.engine_process import EngineHandle
from batching.process_client import EngineDied, ProcessClient

from .errors import BodyLimit, install_handlers
from .logs import configure as configure_logging
from .memory import keep_freed_memory
from .middleware import Observe, RootPath, UntilStarted
from .openapi import add_docs, add_schemas
from .routes import embeddings, native, openai, retrieval, status
from .routes.openai import ChatRequest
from .schemas import CaptionRequest, EmbedRequest, MatchRequest, VQARequest
from .security import ApiKeyAuth
from .service import Service
from .settings import VERSION, Settings, read_worker_spec
from .tracing import TraceRequests, Tracing

log = logging.getLogger("blipserve")


def create_app(
    settings: Settings | None = None,
    service: Service | None = None,
    engine: EngineHandle | list[EngineHandle] | None = None,
    on_engine_death: Callable[[], None] | None = None,
    on_start_failure: Callable[[], None] | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The app. Its service is `service`, or built in the lifespan: connected to the engine process of
    `engine` (started by the server's main process), else to one it starts itself (or, with
    `engine: thread`, a model loaded in this process; a list of handles: --dp engines). The service starts in the background: until it
    has, only /health, /ready (503), /metrics, /version and the API docs answer, the rest is a 503.
    `on_engine_death` runs if that process dies, `on_start_failure` if starting raised.
    `tracing`: trace requests with it; default: as `settings.otlp_traces_endpoint` says (off if unset)."""
    settings = settings or Settings()
    owns_tracing = tracing is None
    tracing = tracing or Tracing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads in the background: the port answers at once (/health 200, /ready 503).
        built: list[Service] = []
        app.state.started, app.state.engine_up = asyncio.Event(), False
        # An engine process that listens has loaded its model (it binds once it has): this process's
        # start-up is then a moment (connect, warm up; a restarted --api-workers process).
        handles = engine if isinstance(engine, list) else [engine] if engine is not None else []
        addresses = [h.address.removeprefix("ipc://") for h in handles]
        app.state.engine_loaded = lambda: any(os.path.exists(a) for a in addresses)
        starting = asyncio.create_task(
            _start(app, settings, service, engine, on_engine_death, built, tracing)
        )
        if on_start_failure is not None:
            starting.add_done_callback(lambda t: t.cancelled() or t.exception() is None or on_start_failure())
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            # Uvicorn has stopped accepting and drained open requests; finish what the engine holds.
            if built:
                await built[0].shutdown()
            if tracing is not None and owns_tracing:
                await asyncio.to_thread(tracing.shutdown)  # the last spans go out

    # /docs and /redoc come from add_docs, with their JavaScript and CSS served here (no CDN).
    app = FastAPI(title="blipserve", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    # Added last = outermost: Observe sees every response, auth runs before any body is read.
    app.add_middleware(UntilStarted)
    # A body over the limit is a 413 while the model loads too: retrying after a 503 would not help.
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * (1 << 20)))
    app.add_middleware(ApiKeyAuth, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(Observe, exclude=settings.access_log_exclude)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path.rstrip("/"))
    if tracing is not None:
        app.add_middleware(TraceRequests, tracing=tracing)  # outermost: Observe logs its trace id
    install_handlers(app)
    for router in (native.router, status.router, openai.router, retrieval.router, embeddings.router):
        app.include_router(router)
    add_schemas(app, [CaptionRequest, VQARequest, ChatRequest, MatchRequest, EmbedRequest])
    add_docs(app)
    return app


def worker_app() -> FastAPI:
    """One of `api_workers` HTTP processes (uvicorn's factory): settings and engine from the main process."""
    settings, handle = read_worker_spec()
    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(1)  # this process decodes images; the engine process does the tensor maths
    keep_freed_memory()  # image buffers stay for the next request (server/memory.py)
    engine = [EngineHandle(**h) for h in handle] if isinstance(handle, list) else EngineHandle(**handle)
    return create_app(settings, engine=engine)


async def _start(
    app: FastAPI,
    settings: Settings,
    service: Service | None,
    engine: EngineHandle | list[EngineHandle] | None,
    on_engine_death: Callable[[], None] | None,
    built: list[Service],
    tracing: Tracing | None = None,
) -> None:
    """Build and start the service, then warm it up; `app.state.service` is set once it is ready
    (`engine_up` once the engine has answered, `started` at the end, whatever the outcome)."""
    try:
        svc = service or await asyncio.to_thread(Service.build, settings, engine)
        built.append(svc)
        svc.tracing = tracing
        if on_engine_death is not None and isinstance(svc.client, ProcessClient):
            svc.client.on_engine_death = on_engine_death
        await svc.start()
        app.state.engine_up = True
        await svc.warm_up()
        app.state.service = svc
        log.info("ready: %s on %s", svc.engine.model_id, svc.lifecycle.device)
    except EngineDied:
        # Its own log line says why; the server stays up, not ready (the main process exits 1).
        log.error("the engine process exited before it was ready")
    except Exception as exc:
        debug = settings.log_level.lower() == "debug"
        log.error("start-up failed: %s: %s", type(exc).__name__, exc, exc_info=debug)
        raise
    finally:
        app.state.started.set()
