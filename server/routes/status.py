"""The status routes: /health, /ready, /version and /metrics answer while the model loads;
/v1/models[/{id}] once the service exists (`UntilStarted` holds them until then)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from batching.dp_client import DataParallelClient
from batching.metrics import Metrics
from batching.process_client import METRICS_TIMEOUT_S
from model.decoding.generation import MAX_LOGPROBS

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
    if svc is None or not svc.lifecycle.ready or not svc.lifecycle.healthy:
        starting = svc is None or (not svc.lifecycle.ready and svc.lifecycle.healthy)
        return error_response(503, "loading the model" if starting else "not ready", {"Retry-After": "1"})
    return JSONResponse({"status": "ready", "model": svc.engine.model_id})


@router.get("/version")
async def version() -> dict:
    return {"version": VERSION}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    svc: Service = request.app.state.service
    return {"object": "list", "data": [model_card(svc)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict:
    svc: Service = request.app.state.service
    if model_id not in served_names(svc):
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return model_card(svc)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc: Service | None = getattr(request.app.state, "service", None)
    # Before the engine is up: the same series, all at zero (blipserve_ready 0).
    try:
        text = await svc.lifecycle.render_metrics() if svc is not None else Metrics().render()
    except TimeoutError:  # a CPU engine answers between steps; a full-size model's step can be long
        message = (
            f"the engine did not answer within {METRICS_TIMEOUT_S:g} s (a CPU engine answers between steps)"
        )
        raise ApiError(503, message, {"Retry-After": "5"}) from None
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def model_card(svc: Service) -> dict:
    """The served model as /v1/models lists it (OpenAI's model object, with blipserve's own fields:
    device, dtype, quantization, the server's limits, the tasks; with --dp each engine's state)."""
    s, e = svc.settings, svc.engine
    card = {
        "id": e.model_id,
        "object": "model",
        "created": svc.lifecycle.created,
        "owned_by": "blipserve",
        "dtype": svc.lifecycle.dtype,
        "device": svc.lifecycle.device,
        "quantization": s.quantize,
        "weight_bytes": svc.lifecycle.weight_bytes,
        "ready": svc.lifecycle.ready,
        "limits": {
            "max_new_tokens": s.max_new_tokens_limit,
            "default_max_new_tokens": s.default_max_new_tokens,
            "max_prompt_tokens": s.max_prompt_tokens,
            "max_beams": s.max_beams,
            "max_n": s.max_n,
            "max_candidates": s.max_candidates,
            "max_logprobs": MAX_LOGPROBS,
            "max_items_per_request": s.max_items_per_request,
            "max_body_bytes": int(s.max_body_mb * (1 << 20)),
            "max_image_pixels": s.max_image_pixels,
            "request_timeout_s": s.request_timeout_s,
            "max_running_seqs": s.max_running_seqs,
            "max_queue": s.max_queue,
        },
        "tasks": list(e.tasks),
        "vqa_template": svc.rules.vqa_template if "vqa" in e.tasks else None,
    }
    if isinstance(svc.client, DataParallelClient):  # --dp: each engine's device and state, how many serve
        card.update(engines=svc.client.describe_engines(), engines_ready=svc.client.ready_engines)
    return card
