"""OpenAI-compatible `POST /v1/chat/completions`, for the clients users already have.

A chat turn maps onto the native endpoints: the last user message's image (a base64 `data:` URL, or an
http(s) URL where URL fetching is on) and its text. Empty text captions the image; any other text is a
question, put into the preset's VQA template unless it has the template's shape already (as on /vqa).
BLIP-2 has no chat history, so earlier turns only supply the image when the last one has none. Errors come in OpenAI's shape (see `server.errors`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from model.data.tokenizer import TextTokenizer
from model.decoding.generation import MAX_LOGPROBS, TokenLogprob
from model.engine import GenerationRequest, GenerationResult

from ..errors import ApiError, invalid
from ..inputs import decode_base64, is_url, load_json, vqa_prompt
from ..openapi import OPENAI_ERRORS
from ..schemas import PRIORITY, GenerationParams
from ..service import Outcome, Service
from ..streaming import EventStream, OutputStreams, sse
from .disconnect import generate


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted, without effect: the model sees 224 px (or its own size)


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


def text_or_list(value: Any, handler: ValidatorFunctionWrapHandler, items: TypeAdapter, what: str) -> Any:
    """A `str | list[...]` field validated as the form that was sent: a list's errors point into it
    (`messages[0].content[1].image_url.url: Field required`), where pydantic's union would report each
    form's failure under its type's name (`content.str: ...; content.list[ContentPart]...`)."""
    if value is None or isinstance(value, str):
        return handler(value)
    if isinstance(value, list):
        return items.validate_python(value)
    raise ValueError(f"expected a string or a list of {what}")


CONTENT_PARTS = TypeAdapter(list[ContentPart])
STRINGS = TypeAdapter(list[str])


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return text_or_list(value, handler, CONTENT_PARTS, "content parts ({'type': 'text' | 'image_url'})")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None  # accepted for compatibility; not used
    priority: int = PRIORITY  # an extra field (as vLLM's): admission order, lower runs later
    # vLLM's extra sampling fields (the openai client sends them through `extra_body`).
    top_k: int | None = Field(None, ge=-1, description="sampling only; -1 or 0: off (vLLM's convention)")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, description="tokens generated before an end token may end the text")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return text_or_list(value, handler, STRINGS, "strings")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _unsupported(cls, value: float) -> float:
        if value != 0:
            raise ValueError("not supported by this server (only 0)")
        return value


def openai_names(body: ChatRequest) -> dict[str, str]:
    """Our fields in this route's words, for its errors: {our field: the field the user sent}."""
    return {
        "max_new_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        "min_new_tokens": "min_tokens",
        "logprobs": "top_logprobs",
        "prompt": "messages",
    }


def generation_params(body: ChatRequest, default_beams: int = 1) -> GenerationParams:
    """OpenAI's sampling fields in ours. temperature 0 is greedy; without a temperature, the server's
    default (greedy) unless n > 1 or top_p asks for samples, which then use temperature 1 (and one beam:
    sampling is never beam search here). `default_beams`: the server's num_beams for greedy requests."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if (body.top_logprobs or 0) > MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs: at most {MAX_LOGPROBS} on this server", param="top_logprobs")
    sample = body.temperature > 0 if body.temperature is not None else body.n > 1 or body.top_p is not None
    if body.n > 1 and not sample and default_beams < body.n:
        raise ApiError(
            400, f"n: {body.n} choices need sampling (temperature > 0); temperature 0 gives one", param="n"
        )
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    fields: dict[str, Any] = {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens,
        "n": body.n,
        "seed": body.seed,
        "stop": stop,
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        "min_new_tokens": body.min_tokens,
        "repetition_penalty": body.repetition_penalty or 1.0,
    }
    if sample:
        top_k = max(body.top_k or 0, 0)
        fields.update(
            do_sample=True,
            temperature=body.temperature or 1.0,
            top_p=body.top_p or 1.0,
            top_k=top_k,
            num_beams=1,
        )
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:
        raise invalid(exc.errors(), 400, openai_names(body)) from None


def image_and_text(messages: list[Message]) -> tuple[str, str]:
    """(image URL or data URL, text) of the turn; 400 without exactly one image."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages: a user message is required", param="messages")
    last = users[-1].content
    texts = [last] if isinstance(last, str) else [p.text or "" for p in last or [] if p.type == "text"]
    for message in reversed(users):
        content = message.content if isinstance(message.content, list) else []
        images = [p.image_url.url for p in content if p.type == "image_url" and p.image_url]
        if len(images) > 1:
            raise ApiError(400, "messages: one image per request", param="messages")
        if images:
            return images[0], " ".join(t.strip() for t in texts if t.strip())
    raise ApiError(400, "messages: an image_url content part is required", param="messages")


def logprobs_json(tok: TextTokenizer, entries: list[TokenLogprob]) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        raw = tok.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def _usage(result: GenerationResult) -> dict:
    total = result.prompt_tokens + result.completion_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": total,
    }


class Chat:
    """One chat completion: its request, id and response formatting."""

    def __init__(self, svc: Service, body: ChatRequest, request: GenerationRequest):
        self.svc, self.body, self.request = svc, body, request
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.tok = svc.engine.tokenizer

    def _envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.svc.engine.model_id}

    def completion(self, outcome: Outcome) -> dict:
        result = outcome.result
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs_json(self.tok, out.logprobs) if out.logprobs is not None else None,
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(result.outputs)
        ]
        return {**self._envelope("chat.completion"), "choices": choices, "usage": _usage(result)}

    def _chunk(self, index: int, delta: dict, lps: list[TokenLogprob] | None, finish: str | None) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs_json(self.tok, lps) if self.body.logprobs and lps is not None else None,
            "finish_reason": finish,
        }
        chunk = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        if self.body.stream_options and self.body.stream_options.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    async def chunks(self, events: AsyncIterator) -> AsyncIterator[bytes]:
        """role chunk per choice, content deltas, a finish chunk per choice, [usage], [DONE]."""
        for i in range(self.request.params.n):
            yield self._chunk(i, {"role": "assistant", "content": ""}, None, None)
        try:
            async for item in OutputStreams(self.svc.engine, self.request).follow(events):
                if isinstance(item, Outcome):
                    outcome = item
                    continue
                if item.text or item.logprobs:
                    yield self._chunk(item.index, {"content": item.text}, item.logprobs, None)
                if item.finish_reason:
                    yield self._chunk(item.index, {}, None, item.finish_reason)
        except ApiError as exc:
            yield sse(
                {"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}}
            )
            return
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield sse(
                {**self._envelope("chat.completion.chunk"), "choices": [], "usage": _usage(outcome.result)}
            )
        yield sse("[DONE]")


router = APIRouter(tags=["openai"])
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
    }
}


@router.post("/v1/chat/completions", responses=OPENAI_ERRORS, openapi_extra=_BODY_DOC)
async def chat_completions(request: Request) -> Response:
    svc: Service = request.app.state.service
    body = await _parse(request)
    if body.model not in served_names(svc):
        raise ApiError(
            404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found"
        )
    url, text = image_and_text(body.messages)
    task = "vqa" if text else "caption"
    if text and "vqa" not in svc.engine.tasks:
        raise ApiError(
            400,
            f"model {svc.engine.model_id} only captions: send the image without text",
            param="messages",
            code="unsupported_task",
        )
    svc.rules.require(task, "/v1/chat/completions")
    names = openai_names(body)
    params = svc.rules.sampling_params(generation_params(body, svc.settings.default_num_beams), task, names)
    image = url if is_url(url) else decode_base64(url, "image_url")
    prepared = (await svc.images.prepare([image], ["image_url"], names))[0]
    prompt = vqa_prompt(text, svc.rules.vqa_template) if text else None
    job = svc.rules.make_request(prepared, prompt, params, names, body.priority)
    chat = Chat(svc, body, job)
    if body.stream:
        return EventStream(chat.chunks(await svc.stream(job)))
    outcome = (await generate(request, svc, [job]))[0]
    return JSONResponse(chat.completion(outcome))


def served_names(svc: Service) -> set[str]:
    """The names a request's `model` may give: --served-model-name's, else the model's id."""
    return set(svc.settings.served_model_name) | {svc.engine.model_id}


async def _parse(request: Request) -> ChatRequest:
    raw = load_json(await request.body(), escape=False)
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc.errors(), 400) from None
