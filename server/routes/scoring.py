"""`candidates` on /caption and /vqa: score given answers instead of generating one.

Each (image, prompt) becomes one `ScoringRequest` that goes through the engine loop like a caption does
(sharing the vision batch and the image-feature cache with everything else) but takes no KV-cache slot
and finishes in the step that admits it: one prefill of the prompt, one batched forward of every
candidate (`model.runtime.scoring`). The reply ranks the candidates, the best first, and gives the best
as the answer (or caption) with `finish_reason` "candidates".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from model.runtime.plan import ScoringRequest
from model.runtime.scoring import ScoringResult

from ..errors import ApiError
from ..inputs import Prepared
from ..schemas import GenerationParams, ImageInput
from ..service import Service, elapsed_ms
from .disconnect import unless_disconnected

FINISH_REASON = "candidates"


@dataclass
class ScoringJob:
    """One image's prompt to score the candidates after: `field` names it as the user sent it."""

    field: str  # "prompt", "question", "questions[1]"...
    prompt: str | None  # None: no prompt (a caption)


def check_candidates(svc: Service, body: ImageInput) -> None:
    """422 naming the field: more candidates than `max_candidates`, or a generation setting beside them
    (stream, n, num_beams, sampling, logprobs, stop...: nothing is generated)."""
    if body.candidates is None:
        return
    limit = svc.settings.max_candidates
    if len(body.candidates) > limit:
        raise ApiError(422, f"candidates: at most {limit} on this server", param="candidates")
    for name, info in GenerationParams.model_fields.items():
        if getattr(body, name) != info.default:
            raise ApiError(
                422, f"{name}: not with candidates (they are scored, nothing is generated)", param=name
            )


def scoring_request(
    svc: Service, image: Prepared, job: ScoringJob, candidates: list[str], priority: int = 0
) -> ScoringRequest:
    """The engine's request for one image and prompt, admitted at `priority` (higher first); 422 naming
    the field as sent (`job.field`: "question", "questions[1]", "prompt") for a prompt that is too long,
    and `candidates[i]` for a candidate that is."""
    s = svc.settings
    try:
        inputs = svc.engine.processor.prompt(job.prompt)  # tokenized once
    except ValueError as exc:
        raise ApiError(422, f"{job.field}: {exc}", param=job.field) from None
    if job.prompt is not None and inputs.text_tokens > s.max_prompt_tokens:
        raise ApiError(422, f"{job.field}: longer than {s.max_prompt_tokens} tokens", param=job.field)
    try:
        request = svc.engine.scoring_request(image.pixel_values, image.key, job.prompt, candidates, inputs)
    except ValueError as exc:
        raise ApiError(422, str(exc), param="candidates") from None
    for i, ids in enumerate(request.candidates):
        if len(ids) > s.max_new_tokens_limit:
            raise ApiError(
                422,
                f"candidates[{i}]: {len(ids)} tokens, more than this server's {s.max_new_tokens_limit}",
                param="candidates",
            )
    request.priority = priority
    return request


async def _score(
    svc: Service, requests: list[ScoringRequest], texts: list[str]
) -> list[tuple[ScoringResult, float]]:
    """Queue every request (all or none), then each one's ranked candidates and queue seconds."""
    tickets = await svc.enqueue_all(requests)
    try:
        dones = await asyncio.gather(*(svc.finished(t) for t in tickets))
    except BaseException:
        for t in tickets:
            svc.client.cancel(t)
        raise
    scored = [
        (svc.engine.scoring_result(r, texts, d.scores), d.queue_s)
        for r, d in zip(requests, dones, strict=True)
    ]
    if svc.tracing is not None:
        for result, _ in scored:
            svc.tracing.record_usage(result.prompt_tokens, 0)
    return scored


def _ranked(result: ScoringResult) -> list[dict]:
    """The reply's `candidates`: best first, each with its place in the request's list."""
    return [
        {
            "index": c.index,
            "text": c.text,
            "logprob": c.logprob,
            "mean_logprob": c.mean_logprob,
            "tokens": c.tokens,
        }
        for c in result.candidates
    ]


def _usage(results: list[ScoringResult]) -> dict:
    """OpenAI-style usage: the prompts' positions (image queries included); nothing is generated."""
    return {"prompt_tokens": sum(r.prompt_tokens for r in results), "completion_tokens": 0}


async def answer_candidates(
    request: Request,
    svc: Service,
    jobs: list[tuple[Prepared, ScoringJob]],
    candidates: list[str],
    single: bool,
    key: str,
    start: float,
    priority: int = 0,
) -> dict:
    """The reply to /caption (`key` "caption") or /vqa ("answer") with candidates: `{key: best,
    "candidates": ranked}` for the single form, `{key + "s": [{"text", "candidates", ...}]}` for the
    batch form. The work is cancelled if the client goes away; `start`: when the
    request came (time.perf_counter()); `priority`: the body's (admission order, higher first)."""
    requests = [scoring_request(svc, image, job, candidates, priority) for image, job in jobs]
    scored = await unless_disconnected(request, _score(svc, requests, candidates))
    results = [r for r, _ in scored]
    body: dict = {"model": svc.engine.model_id}
    if single:
        body.update({key: results[0].text, "finish_reason": FINISH_REASON, "candidates": _ranked(results[0])})
    else:
        body[key + "s"] = [
            {"text": r.text, "finish_reason": FINISH_REASON, "usage": _usage([r]), "candidates": _ranked(r)}
            for r in results
        ]
    body["usage"] = _usage(results)
    queue_ms = round(max(q for _, q in scored) * 1000, 2)
    body["timings"] = {"queue_ms": queue_ms, "total_ms": elapsed_ms(start)}
    return body
