"""The status routes: /health, /ready, /version and /metrics answer while the model loads;
/v1/models[/{id}] once the service exists (`UntilStarted` holds them until then)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from batching.metrics import Metrics

from ..errors import ApiError, error_response
from ..openapi import ERRORS
from ..service import Service
from ..settings import VERSION
from .openai import served_names

router = APIRouter(tags=["status"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: ERRORS[503]})
async def ready(request: Request) -> Response:
    svc: Service | None = getattr(request.app.state, "service", None)
    if svc is None or not svc.ready or not svc.healthy:
        starting = svc is None or (not svc.ready and svc.healthy)
        return error_response(503, "loading the model" if starting else "not ready", {"Retry-After": "1"})
    return JSONResponse({"status": "ready", "model": svc.engine.model_id})


@router.get("/version")
async def version() -> dict:
    return {"version": VERSION}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    svc: Service = request.app.state.service
    return {"object": "list", "data": [svc.describe()]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict:
    svc: Service = request.app.state.service
    if model_id not in served_names(svc):
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return svc.describe()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc: Service | None = getattr(request.app.state, "service", None)
    # Before the engine is up: the same series, all at zero (blipserve_ready 0).
    text = await svc.render_metrics() if svc is not None else Metrics().render()
    return Response(text, media_type=CONTENT_TYPE_LATEST)
