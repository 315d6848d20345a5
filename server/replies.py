"""Response bodies of the native endpoints (/caption, /vqa): JSON, or a stream of Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from model.data.tokenizer import TextTokenizer
from model.decoding.generation import TokenLogprob
from model.engine import Completion, GenerationRequest, GenerationResult

from .errors import TYPES, ApiError
from .service import Outcome, Service, elapsed_ms
from .streaming import OutputStreams, sse


def logprob_json(tok: TextTokenizer, entry: TokenLogprob) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = tok.token_bytes(token_id).decode("utf-8", errors="replace")
        return {"id": token_id, "token": text, "logprob": logprob}

    return {**one(entry.token, entry.logprob), "top": [one(t, lp) for t, lp in entry.top]}


def choices_json(tok: TextTokenizer, outputs: list[Completion]) -> list[dict]:
    choices = []
    for i, out in enumerate(outputs):
        choice: dict = {"index": i, "text": out.text, "finish_reason": out.finish_reason}
        if out.logprobs is not None:
            choice["logprobs"] = [logprob_json(tok, e) for e in out.logprobs]
        choices.append(choice)
    return choices


def _wants_choices(result: GenerationResult) -> bool:
    return len(result.outputs) > 1 or result.outputs[0].logprobs is not None


def _usage(results: list[GenerationResult]) -> dict:
    return {
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": sum(r.completion_tokens for r in results),
    }


def reply(svc: Service, outcomes: list[Outcome], start: float, single: bool, key: str) -> dict:
    """`{key: text}` for the single form, `{key + "s": [items]}` for the batch form; `choices` with n > 1
    or logprobs (the first choice is the main text)."""
    results = [o.result for o in outcomes]
    tok = svc.engine.tokenizer
    body: dict = {
        "model": svc.engine.model_id,
        "usage": _usage(results),
        "timings": {
            "queue_ms": round(max(o.queue_s for o in outcomes) * 1000, 2),
            "total_ms": elapsed_ms(start),
        },
    }
    if single:
        body[key] = results[0].text
        body["finish_reason"] = results[0].finish_reason
        if _wants_choices(results[0]):
            body["choices"] = choices_json(tok, results[0].outputs)
        return body
    items = []
    for r in results:
        item = {"text": r.text, "finish_reason": r.finish_reason, "usage": _usage([r])}
        if _wants_choices(r):
            item["choices"] = choices_json(tok, r.outputs)
        items.append(item)
    body[key + "s"] = items
    return body


async def event_stream(svc: Service, request: GenerationRequest, start: float) -> AsyncIterator[bytes]:
    """`{"index", "text", "logprobs"?}` per delta; last `{"done": true, "choices", "finish_reason", "usage",
    "timings"}`, or `{"error": {...}}` should the request fail after the stream began."""
    events = await svc.stream(request)  # queued now: a full queue is an HTTP 429, not an event
    return _native_events(svc, request, events, start)


async def _native_events(
    svc: Service, request: GenerationRequest, events, start: float
) -> AsyncIterator[bytes]:
    tok = svc.engine.tokenizer
    try:
        async for item in OutputStreams(svc.engine, request).follow(events):
            if isinstance(item, Outcome):
                outcome = item
            elif item.text or item.logprobs:
                yield sse(_delta(tok, item.index, item.text, item.logprobs, request))
    except ApiError as exc:
        yield sse({"error": {"type": TYPES.get(exc.status, "error"), "message": exc.message}})
        return
    result = outcome.result
    choices = [
        {"index": i, "text": o.text, "finish_reason": o.finish_reason} for i, o in enumerate(result.outputs)
    ]
    yield sse(
        {
            "done": True,
            "model": svc.engine.model_id,
            "choices": choices,
            "finish_reason": result.finish_reason,
            "usage": _usage([result]),
            "timings": {"queue_ms": round(outcome.queue_s * 1000, 2), "total_ms": elapsed_ms(start)},
        }
    )


def _delta(
    tok: TextTokenizer, index: int, text: str, lps: list[TokenLogprob], request: GenerationRequest
) -> dict:
    event: dict = {"index": index, "text": text}
    if request.params.logprobs is not None:
        event["logprobs"] = [logprob_json(tok, e) for e in lps]
    return event
