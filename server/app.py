"""The HTTP layer: validate, forward to the engine loop, format. Built by `create_app`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import torch
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .embeddings_api import add_embeddings_routes
from .engine_client import EngineDied, ProcessClient
from .engine_process import EngineHandle
from .errors import ApiError, BodyLimit, error_response, install_handlers
from .inputs import parse_body
from .logs import configure as configure_logging
from .openai_api import ChatRequest, add_openai_routes
from .replies import event_stream, reply
from .retrieval_api import add_retrieval_routes
from .schemas import (
    CaptionRequest,
    CaptionResponse,
    EmbedRequest,
    ErrorResponse,
    MatchRequest,
    VQARequest,
    VQAResponse,
)
from .security import ApiKeyAuth
from .service import Outcome, Service, elapsed_ms
from .settings import Settings, read_worker_spec
from .streaming import EventStream
from .tracing import TraceRequests, Tracing

log = logging.getLogger("blipserve")
T = TypeVar("T")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 503, 504)}


def _body_doc(model: type) -> dict:
    """OpenAPI: the fields as JSON (image as base64), or as multipart form fields with file parts."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    properties = {
        k: v for k, v in model.model_json_schema()["properties"].items() if k not in ("image", "images")
    }
    properties["image"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    form = {"type": "object", "properties": properties, "required": ["image"]}
    content = {"application/json": {"schema": ref}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


def create_app(
    settings: Settings | None = None,
    service: Service | None = None,
    engine: EngineHandle | None = None,
    on_engine_death: Callable[[], None] | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The app. Its service is `service`, or built in the lifespan: connected to the engine process of
    `engine` (started by the server's main process), else to one it starts itself (or, with
    `engine: thread`, a model loaded in this process). `on_engine_death` runs if that process dies.
    `tracing`: trace requests with it; default: as `settings.otlp_traces_endpoint` says (off if unset)."""
    settings = settings or Settings()
    owns_tracing = tracing is None
    tracing = tracing or Tracing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or await asyncio.to_thread(Service.build, settings, engine)
        app.state.service = svc
        svc.tracing = tracing
        if on_engine_death is not None and isinstance(svc.client, ProcessClient):
            svc.client.on_engine_death = on_engine_death
        try:
            try:
                await svc.start()
                await svc.warm_up()
                log.info("ready: %s on %s", svc.engine.model_id, svc.device)
            except EngineDied:
                # Its own log line says why; the server stays up, not ready (the main process exits 1).
                log.error("the engine process exited before it was ready")
            yield
        finally:
            # Uvicorn has stopped accepting and drained open requests; finish what the engine holds.
            await svc.shutdown()
            if tracing is not None and owns_tracing:
                await asyncio.to_thread(tracing.shutdown)  # the last spans go out

    app = FastAPI(title="blipserve", version="0.1.0", lifespan=lifespan)
    # Added last = outermost: Observe sees every response, auth runs before any body is read.
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * (1 << 20)))
    app.add_middleware(ApiKeyAuth, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(Observe)
    if tracing is not None:
        app.add_middleware(TraceRequests, tracing=tracing)  # outermost: Observe logs its trace id
    install_handlers(app)
    _add_routes(app)
    add_openai_routes(app, _run)
    add_retrieval_routes(app, _unless_disconnected)
    add_embeddings_routes(app, _unless_disconnected)
    _add_schemas(app)
    return app


def worker_app() -> FastAPI:
    """One of `api_workers` HTTP processes (uvicorn's factory): settings and engine from the main process."""
    settings, handle = read_worker_spec()
    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(1)  # this process decodes images; the engine process does the tensor maths
    return create_app(settings, engine=EngineHandle(**handle))


class Observe:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints):
    a request id on every response and in the log, request counts and latency for the generation routes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            svc: Service | None = getattr(scope["app"].state, "service", None)
            if svc is not None and path in ROUTES_MEASURED:
                svc.record_http(path, status, time.perf_counter() - start)
            ms, method = elapsed_ms(start), scope.get("method")
            client = (scope.get("client") or ("", 0))[0]
            extra = {"request_id": request_id, "method": method, "path": path, "status": status}
            extra.update(duration_ms=ms, client=client)
            trace_id = scope["state"].get("trace_id")  # set by TraceRequests when tracing is on
            if trace_id:
                extra["trace_id"] = trace_id
            trace = f" trace={trace_id}" if trace_id else ""
            log.info("%s %s %s %.1fms id=%s%s", method, path, status, ms, request_id, trace, extra=extra)


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


ROUTES_MEASURED = ("/caption", "/vqa", "/match", "/embed")


def _add_routes(app: FastAPI) -> None:
    @app.post(
        "/caption", response_model=CaptionResponse, responses=ERRORS, openapi_extra=_body_doc(CaptionRequest)
    )
    async def caption(request: Request) -> JSONResponse:
        start = time.perf_counter()
        svc: Service = request.app.state.service
        svc.require("caption", "/caption")
        parsed = await parse_body(request, CaptionRequest)
        params = svc.sampling_params(parsed.body)
        images = await svc.prepare_images(parsed.images)
        jobs = [svc.make_request(im, parsed.body.prompt, params) for im in images]
        single = parsed.body.image is not None
        if parsed.body.stream:
            return await _stream(svc, jobs, single, start)
        outcomes = await _run(request, svc, jobs)
        return JSONResponse(reply(svc, outcomes, start, single, "caption"))

    @app.post("/vqa", response_model=VQAResponse, responses=ERRORS, openapi_extra=_body_doc(VQARequest))
    async def vqa(request: Request) -> JSONResponse:
        start = time.perf_counter()
        svc: Service = request.app.state.service
        svc.require("vqa", "/vqa")
        parsed = await parse_body(request, VQARequest)
        body: VQARequest = parsed.body
        params = svc.sampling_params(body, "vqa")
        questions = body.questions if body.questions is not None else [body.question]
        blobs = parsed.images
        if len(blobs) > 1 and len(questions) > 1 and len(blobs) != len(questions):
            raise ApiError(422, f"questions: {len(questions)} given for {len(blobs)} images")
        svc.limit_items(len(questions), "questions")
        images = await svc.prepare_images(blobs)
        n = max(len(images), len(questions))
        pairs = [
            (images[i if len(images) > 1 else 0], questions[i if len(questions) > 1 else 0]) for i in range(n)
        ]
        template = svc.vqa_template
        jobs = [svc.make_request(im, template.format(question=q.strip()), params) for im, q in pairs]
        single = body.image is not None and body.question is not None
        if body.stream:
            return await _stream(svc, jobs, single, start)
        outcomes = await _run(request, svc, jobs)
        return JSONResponse(reply(svc, outcomes, start, single, "answer"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        svc: Service | None = getattr(request.app.state, "service", None)
        if svc is None or not svc.ready or not svc.healthy:
            return error_response(503, "not ready", {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": svc.engine.model_id})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc: Service = request.app.state.service
        return Response(await svc.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        svc: Service = request.app.state.service
        return {"object": "list", "data": [svc.describe()]}


def _add_schemas(app: FastAPI) -> None:
    """Put the request models into the OpenAPI components that the routes' request bodies reference."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CaptionRequest, VQARequest, ChatRequest, MatchRequest, EmbedRequest):
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
