"""The HTTP layer: validate, forward to the engine loop, format. Built by `create_app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import torch
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from batching.engine_process import EngineHandle
from batching.metrics import Metrics
from batching.process_client import EngineDied, ProcessClient

from .errors import ApiError, BodyLimit, error_response, install_handlers, named
from .inputs import parse_body, vqa_prompts
from .logs import configure as configure_logging
from .middleware import Observe, RootPath, UntilStarted
from .openapi import ERRORS, add_docs, add_schemas, body_doc
from .replies import event_stream, reply
from .routes.embeddings import add_embeddings_routes
from .routes.openai import ChatRequest, add_openai_routes, served_names
from .routes.retrieval import add_retrieval_routes
from .routes.scoring import ScoringJob, answer_candidates, check_candidates
from .schemas import (
    CaptionRequest,
    CaptionResponse,
    EmbedRequest,
    MatchRequest,
    VQARequest,
    VQAResponse,
)
from .security import ApiKeyAuth
from .service import Outcome, Service
from .settings import VERSION, Settings, read_worker_spec
from .streaming import EventStream
from .tracing import TraceRequests, Tracing

log = logging.getLogger("blipserve")
T = TypeVar("T")


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
    _add_routes(app)
    add_openai_routes(app, _run)
    add_retrieval_routes(app, _unless_disconnected)
    add_embeddings_routes(app, _unless_disconnected)
    add_schemas(app, [CaptionRequest, VQARequest, ChatRequest, MatchRequest, EmbedRequest])
    add_docs(app)
    return app


def worker_app() -> FastAPI:
    """One of `api_workers` HTTP processes (uvicorn's factory): settings and engine from the main process."""
    settings, handle = read_worker_spec()
    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(1)  # this process decodes images; the engine process does the tensor maths
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
        log.info("ready: %s on %s", svc.engine.model_id, svc.device)
    except EngineDied:
        # Its own log line says why; the server stays up, not ready (the main process exits 1).
        log.error("the engine process exited before it was ready")
    except Exception as exc:
        debug = settings.log_level.lower() == "debug"
        log.error("start-up failed: %s: %s", type(exc).__name__, exc, exc_info=debug)
        raise
    finally:
        app.state.started.set()


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


async def _run(request: Request, svc: Service, jobs) -> list[Outcome]:
    """Generate, but give up (freeing the KV slots) as soon as the client goes away."""
    return await _unless_disconnected(request, svc.generate(jobs))


async def _unless_disconnected(request: Request, job: Awaitable[T]) -> T:
    """Await `job`, cancelling it (499) as soon as the client goes away."""
    work = asyncio.ensure_future(job)
    watch = asyncio.ensure_future(_until_disconnected(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        raise ApiError(499, "client disconnected")
    watch.cancel()
    return work.result()


async def _stream(svc: Service, jobs: list, single: bool, start: float) -> EventStream:
    if not single:
        raise ApiError(422, "stream: only for the single form (one image, one question)")
    return EventStream(await event_stream(svc, jobs[0], start))


def _add_routes(app: FastAPI) -> None:
    """The native generation routes (/caption, /vqa) and the status routes."""
    _add_generation_routes(app)
    _add_status_routes(app)


def _add_generation_routes(app: FastAPI) -> None:
    @app.post(
        "/caption", response_model=CaptionResponse, responses=ERRORS, openapi_extra=body_doc(CaptionRequest)
    )
    async def caption(request: Request) -> JSONResponse:
        start = time.perf_counter()
        svc: Service = request.app.state.service
        svc.require("caption", "/caption")
        parsed = await parse_body(request, CaptionRequest)
        check_candidates(svc, parsed.body)  # with candidates nothing is generated: no sampling params
        params = None if parsed.body.candidates else svc.sampling_params(parsed.body, names=parsed.names)
        images = await svc.prepare_images(parsed.images, parsed.image_fields, parsed.names)
        single = parsed.body.image is not None
        if parsed.body.candidates:
            job = ScoringJob(named("prompt", parsed.names), parsed.body.prompt)
            scored = await answer_candidates(
                request,
                svc,
                [(im, job) for im in images],
                parsed.body.candidates,
                single,
                "caption",
                _unless_disconnected,
                start,
                parsed.body.priority,
            )
            return JSONResponse(scored)
        jobs = [
            svc.make_request(im, parsed.body.prompt, params, parsed.names, parsed.body.priority)
            for im in images
        ]
        if parsed.body.stream:
            return await _stream(svc, jobs, single, start)
        outcomes = await _run(request, svc, jobs)
        return JSONResponse(reply(svc, outcomes, start, single, "caption"))

    @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, openapi_extra=body_doc(VQARequest))
    async def vqa(request: Request) -> JSONResponse:
        start = time.perf_counter()
        svc: Service = request.app.state.service
        svc.require("vqa", "/vqa")
        parsed = await parse_body(request, VQARequest)
        body: VQARequest = parsed.body
        check_candidates(svc, body)
        params = None if body.candidates else svc.sampling_params(body, "vqa", parsed.names)
        prompts = vqa_prompts(body, svc.vqa_template, parsed.names)  # (field as sent, prompt)
        blobs, many = parsed.images, named("questions", parsed.names)
        if len(blobs) > 1 and len(prompts) > 1 and len(blobs) != len(prompts):
            raise ApiError(422, f"{many}: {len(prompts)} given for {len(blobs)} images", param=many)
        svc.limit_items(len(prompts), many)
        images = await svc.prepare_images(blobs, parsed.image_fields, parsed.names)
        n = max(len(images), len(prompts))
        pairs = [
            (images[i if len(images) > 1 else 0], prompts[i if len(prompts) > 1 else 0]) for i in range(n)
        ]
        names = parsed.names
        single = body.image is not None and body.questions is None
        if body.candidates:
            scored_pairs = [(im, ScoringJob(field, text)) for im, (field, text) in pairs]
            scored = await answer_candidates(
                request,
                svc,
                scored_pairs,
                body.candidates,
                single,
                "answer",
                _unless_disconnected,
                start,
                body.priority,
            )
            return JSONResponse(scored)
        jobs = [
            svc.make_request(im, text, params, {**names, "prompt": field}, body.priority)
            for im, (field, text) in pairs
        ]
        if body.stream:
            return await _stream(svc, jobs, single, start)
        outcomes = await _run(request, svc, jobs)
        return JSONResponse(reply(svc, outcomes, start, single, "answer"))


def _add_status_routes(app: FastAPI) -> None:
    """/health, /ready, /version and /metrics answer while the model loads; /v1/models[/{id}] once the
    service exists (`UntilStarted` holds them until then)."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: ERRORS[503]})
    async def ready(request: Request) -> Response:
        svc: Service | None = getattr(request.app.state, "service", None)
        if svc is None or not svc.ready or not svc.healthy:
            starting = svc is None or (not svc.ready and svc.healthy)
            return error_response(503, "loading the model" if starting else "not ready", {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": svc.engine.model_id})

    @app.get("/version")
    async def version() -> dict:
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        svc: Service = request.app.state.service
        return {"object": "list", "data": [svc.describe()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        svc: Service = request.app.state.service
        if model_id not in served_names(svc):
            raise ApiError(
                404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found"
            )
        return svc.describe()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc: Service | None = getattr(request.app.state, "service", None)
        # Before the engine is up: the same series, all at zero (blipserve_ready 0).
        text = await svc.render_metrics() if svc is not None else Metrics().render()
        return Response(text, media_type=CONTENT_TYPE_LATEST)
