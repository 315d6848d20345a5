"""OpenAI-compatible `POST /v1/embeddings` for the retrieval checkpoints (BLIP-2 and BLIP ITM/ITC).

`input` is a string, a list of strings, or a list whose items are strings or content parts: a text part
`{"type": "text", "text": ...}` or an image part `{"type": "image_url", "image_url": {"url": ...}}` (as
vLLM's multimodal embeddings take; a base64 `data:` URL, or http(s) with `--allow-image-urls`). Every item
gets one embedding, `data[i]` for `input[i]`, whatever its kind: a list may mix texts and images, and then
holds text and image embeddings of the same space side by side.

The values are `/embed`'s: a text's is its normalised ITC embedding; an image's is BLIP's one normalised
embedding, or for BLIP-2 (32 query embeddings per image, whose ITC similarity to a text is the largest of
the 32 dot products) the normalised mean of the 32 (`pooled`): one vector of the text embeddings' width,
so images and texts share one index, and its cosine with a text follows the mean of the 32 query
similarities. `/embed` keeps returning the 32 for the exact ITC score. `encoding_format: base64` is the
little-endian float32 bytes of each vector, as OpenAI's.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.runtime.plan import RetrievalOutput, RetrievalRequest

from ..errors import ApiError, invalid
from ..inputs import Prepared, decode_base64, is_url, load_json
from ..service import Service
from .disconnect import unless_disconnected
from .openai import ContentPart

router = APIRouter(tags=["openai"])

MAX_INPUTS = 2048  # OpenAI's bound on one request's inputs
TEXTS_PER_JOB = 64  # texts per engine request (as many as /embed takes)
MAX_TEXT_CHARS = 4000  # as /embed


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[Any] | dict[str, Any] = Field(
        description="a string, a list of strings, or a list of strings and content parts "
        '({"type": "text", "text"} or {"type": "image_url", "image_url": {"url"}})'
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own width (no truncation)")
    user: str | None = None  # accepted for compatibility; not used


def input_items(value: str | list[Any] | dict[str, Any]) -> list[tuple[str, str]]:
    """`input` as ("text", text) and ("image", URL or data URL) items, in order; 400 naming the item
    for an empty list, an empty or overlong text, token ids (not supported), or a malformed part."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ApiError(400, "input: must not be empty", param="input")
    if len(values) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} items", param="input")
    items = []
    for i, item in enumerate(values):
        where = f"input[{i}]" if isinstance(value, list) else "input"
        if isinstance(item, dict):
            items.append(_part(item, where))
        elif isinstance(item, str):
            items.append(("text", item))
        elif isinstance(item, int | list) and not isinstance(item, bool):
            raise ApiError(400, f"{where}: token ids are not supported; send the text", param="input")
        else:
            raise ApiError(400, f"{where}: expected a string or a content part", param="input")
        if items[-1][0] == "text" and not 0 < len(items[-1][1]) <= MAX_TEXT_CHARS:
            raise ApiError(400, f"{where}: a text must be 1 to {MAX_TEXT_CHARS} characters", param="input")
    return items


def _part(raw: dict[str, Any], where: str) -> tuple[str, str]:
    try:
        part = ContentPart.model_validate(raw)
    except ValidationError as exc:
        error = invalid(exc.errors(), 400)
        raise ApiError(400, f"{where}.{error.message}", param="input") from None
    if part.type == "text":
        if part.text is None:
            raise ApiError(400, f"{where}.text: required in a text part", param="input")
        return "text", part.text
    if part.image_url is None:
        raise ApiError(400, f"{where}.image_url: required in an image_url part", param="input")
    return "image", part.image_url.url


def pooled(vectors: list[list[float]]) -> list[float]:
    """One embedding for an image: its only one (BLIP), or the L2-normalised mean of its per-query
    embeddings (BLIP-2: [32, D] -> [D]), as float32 values (so float and base64 agree)."""
    if len(vectors) == 1:
        return vectors[0]
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32).tolist()


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """The vector as floats, or base64 of its little-endian float32 bytes (OpenAI's `base64`)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _text_jobs(svc: Service, texts: list[tuple[int, str]], listed: bool) -> list[RetrievalRequest]:
    """Engine requests for the texts ((index in `input`, text)), `TEXTS_PER_JOB` to a request; 400
    naming an overlong one as the request does (`input[i]`, or `input` when it is one string).
    Tokenized once, by one engine request over every text (so each text's length is checked before
    any text's positions, as for one request), then split."""
    if not texts:
        return []
    names = [f"input[{i}]" if listed else "input" for i, _ in texts]
    limit = svc.settings.max_prompt_tokens
    try:
        whole = svc.engine.retrieval_request("embed", None, "", [t for _, t in texts], limit, names)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="input") from None
    return [
        RetrievalRequest("embed", None, "", whole.texts[start : start + TEXTS_PER_JOB])
        for start in range(0, len(whole.texts), TEXTS_PER_JOB)
    ]


def _check_body(svc: Service, body: EmbeddingRequest) -> None:
    """404 for another model's id, 400 `unsupported_task` for a model that does not embed, 400 for a
    `dimensions` other than the model's own."""
    if body.model != svc.engine.model_id:
        raise ApiError(
            404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found"
        )
    svc.rules.require("embed", "/v1/embeddings")
    width = svc.engine.cfg.image_text_hidden_size
    if body.dimensions is not None and body.dimensions != width:
        raise ApiError(
            400,
            f"dimensions: this model's embeddings have {width} (they are not trained to be truncated)",
            param="dimensions",
        )


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
    }
}


@router.post("/v1/embeddings", openapi_extra=_BODY_DOC)
async def embeddings(request: Request) -> dict:
    svc: Service = request.app.state.service
    body = await _parse(request)
    _check_body(svc, body)
    items = input_items(body.input)
    texts = [(i, v) for i, (kind, v) in enumerate(items) if kind == "text"]
    urls = [(i, v) for i, (kind, v) in enumerate(items) if kind == "image"]
    images = await _images(svc, urls) if urls else []
    jobs = [svc.rules.retrieval_request("embed", im, []) for im in images] + _text_jobs(
        svc, texts, isinstance(body.input, list)
    )
    outs: list[RetrievalOutput] = await unless_disconnected(request, svc.retrieve(jobs))
    vectors: list[list[float]] = [[] for _ in items]
    for (i, _), out in zip(urls, outs, strict=False):
        vectors[i] = pooled(out.image_embedding)
    text_vectors = [v for out in outs[len(urls) :] for v in out.text_embeddings]
    for (i, _), vector in zip(texts, text_vectors, strict=True):
        vectors[i] = vector
    tokens = sum(len(ids) for job in jobs for ids in job.texts)
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": svc.engine.model_id, "usage": usage}


async def _images(svc: Service, urls: list[tuple[int, str]]) -> list[Prepared]:
    """The image parts' pixels (`urls`: (index in `input`, URL or data URL)); 400 naming the item
    (`input[i]`, param "input") for too many, a URL this server does not fetch, bad base64, or bytes
    that are not an image."""
    limit = svc.settings.max_items_per_request
    if len(urls) > limit:
        raise ApiError(400, f"input: at most {limit} images per request", param="input")
    try:
        blobs: list[bytes | str] = []
        for i, url in urls:
            if is_url(url) and not svc.settings.allow_image_urls:
                raise ApiError(
                    400,
                    f"input[{i}]: image URLs are not fetched by this server (--allow-image-urls is off); "
                    "send a data: URL",
                )
            blobs.append(url if is_url(url) else decode_base64(url, f"input[{i}]"))
        return await svc.images.prepare(blobs, [f"input[{i}]" for i, _ in urls])
    except ApiError as exc:
        exc.param = "input"  # OpenAI's `param` is the request's field; the message names the item
        raise


async def _parse(request: Request) -> EmbeddingRequest:
    """The body as an `EmbeddingRequest`; 400 naming the field (OpenAI's shape) when it is not one."""
    raw = load_json(await request.body(), escape=False)
    try:
        return EmbeddingRequest.model_validate(raw)
    except ValidationError as exc:
        if any(e["loc"][:1] == ("input",) and len(e["loc"]) > 1 for e in exc.errors()):
            # Not one of the union's shapes: say which shapes, not each one's complaint.
            raise ApiError(
                400, "input: expected a string or a list of strings and content parts", param="input"
            ) from None
        raise invalid(exc.errors(), 400) from None
