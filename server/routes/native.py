"""The native generation routes: `POST /caption` and `POST /vqa` (JSON or multipart; one image or a
batch; generated text, a stream of events, or given candidates scored)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import ApiError, named
from ..inputs import parse_body, vqa_prompts
from ..openapi import ERRORS, body_doc
from ..replies import event_stream, reply
from ..schemas import CaptionRequest, CaptionResponse, VQARequest, VQAResponse
from ..service import Service
from ..streaming import EventStream
from .disconnect import generate
from .scoring import ScoringJob, answer_candidates, check_candidates

router = APIRouter(tags=["native"])


async def _stream(svc: Service, jobs: list, single: bool, start: float) -> EventStream:
    if not single:
        raise ApiError(422, "stream: only for the single form (one image, one question)")
    return EventStream(await event_stream(svc, jobs[0], start))


@router.post(
    "/caption", response_model=CaptionResponse, responses=ERRORS, openapi_extra=body_doc(CaptionRequest)
)
async def caption(request: Request) -> JSONResponse:
    start = time.perf_counter()
    svc: Service = request.app.state.service
    svc.rules.require("caption", "/caption")
    parsed = await parse_body(request, CaptionRequest)
    check_candidates(svc, parsed.body)  # with candidates nothing is generated: no sampling params
    params = None if parsed.body.candidates else svc.rules.sampling_params(parsed.body, names=parsed.names)
    images = await svc.images.prepare(parsed.images, parsed.image_fields, parsed.names)
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
            start,
            parsed.body.priority,
        )
        return JSONResponse(scored)
    jobs = [
        svc.rules.make_request(im, parsed.body.prompt, params, parsed.names, parsed.body.priority)
        for im in images
    ]
    if parsed.body.stream:
        return await _stream(svc, jobs, single, start)
    outcomes = await generate(request, svc, jobs)
    return JSONResponse(reply(svc, outcomes, start, single, "caption"))


@router.post("/vqa", response_model=VQAResponse, responses=ERRORS, openapi_extra=body_doc(VQARequest))
async def vqa(request: Request) -> JSONResponse:
    start = time.perf_counter()
    svc: Service = request.app.state.service
    svc.rules.require("vqa", "/vqa")
    parsed = await parse_body(request, VQARequest)
    body: VQARequest = parsed.body
    check_candidates(svc, body)
    params = None if body.candidates else svc.rules.sampling_params(body, "vqa", parsed.names)
    prompts = vqa_prompts(body, svc.rules.vqa_template, parsed.names)  # (field as sent, prompt)
    blobs, many = parsed.images, named("questions", parsed.names)
    if len(blobs) > 1 and len(prompts) > 1 and len(blobs) != len(prompts):
        raise ApiError(422, f"{many}: {len(prompts)} given for {len(blobs)} images", param=many)
    svc.rules.limit_items(len(prompts), many)
    images = await svc.images.prepare(blobs, parsed.image_fields, parsed.names)
    n = max(len(images), len(prompts))
    pairs = [(images[i if len(images) > 1 else 0], prompts[i if len(prompts) > 1 else 0]) for i in range(n)]
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
            start,
            body.priority,
        )
        return JSONResponse(scored)
    jobs = [
        svc.rules.make_request(im, text, params, {**names, "prompt": field}, body.priority)
        for im, (field, text) in pairs
    ]
    if body.stream:
        return await _stream(svc, jobs, single, start)
    outcomes = await generate(request, svc, jobs)
    return JSONResponse(reply(svc, outcomes, start, single, "answer"))
