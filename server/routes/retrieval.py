"""`POST /match` and `POST /embed`: image-text matching scores and embeddings (retrieval checkpoints).

Each request goes through the engine loop like a caption does (so images share the vision batch and
the image-feature cache with everything else) but takes no KV-cache slot and finishes in one step.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from model.runtime.plan import RetrievalOutput

from ..inputs import parse_body
from ..openapi import ERRORS, body_doc
from ..schemas import EmbedRequest, EmbedResponse, MatchRequest, MatchResponse
from ..service import Service, elapsed_ms
from .disconnect import unless_disconnected

router = APIRouter(tags=["retrieval"])


def _scores(out: RetrievalOutput) -> list[dict]:
    return [{"text": i, "itm": p, "itc": s} for i, (p, s) in enumerate(zip(out.itm, out.itc, strict=True))]


@router.post("/match", response_model=MatchResponse, responses=ERRORS, openapi_extra=body_doc(MatchRequest))
async def match(request: Request) -> dict:
    start = time.perf_counter()
    svc: Service = request.app.state.service
    svc.rules.require("match", "/match")
    parsed = await parse_body(request, MatchRequest)
    body: MatchRequest = parsed.body
    images = await svc.images.prepare(parsed.images, parsed.image_fields, parsed.names)
    jobs = [svc.rules.retrieval_request("match", im, body.texts) for im in images]
    outs = await unless_disconnected(request, svc.retrieve(jobs))
    reply: dict = {"model": svc.engine.model_id}
    if body.image is not None:
        reply["scores"] = _scores(outs[0])
    else:
        reply["matches"] = [_scores(o) for o in outs]
    reply["timings"] = {"total_ms": elapsed_ms(start)}
    return reply


@router.post(
    "/embed", response_model=EmbedResponse, responses=ERRORS, openapi_extra=body_doc(EmbedRequest, False)
)
async def embed(request: Request) -> dict:
    start = time.perf_counter()
    svc: Service = request.app.state.service
    svc.rules.require("embed", "/embed")
    parsed = await parse_body(request, EmbedRequest)
    body: EmbedRequest = parsed.body
    texts = body.texts or []
    svc.rules.limit_items(len(texts), "texts")
    images = (
        await svc.images.prepare(parsed.images, parsed.image_fields, parsed.names) if parsed.images else []
    )
    jobs = [svc.rules.retrieval_request("embed", im, []) for im in images]
    if texts:
        jobs.append(svc.rules.retrieval_request("embed", None, texts))
    outs = await unless_disconnected(request, svc.retrieve(jobs))
    image_embeddings = [o.image_embedding for o in outs[: len(images)]]
    text_embeddings = outs[-1].text_embeddings if texts else []
    first = image_embeddings[0][0] if image_embeddings else text_embeddings[0]
    return {
        "model": svc.engine.model_id,
        "dimensions": len(first),
        "image_embeddings": image_embeddings,
        "text_embeddings": text_embeddings,
        "timings": {"total_ms": elapsed_ms(start)},
    }
