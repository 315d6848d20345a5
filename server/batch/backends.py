"""Who answers the rows of `blipserve batch`: the model in this process, or a running server.

Both validate and answer through the server's own code: `LocalBackend` holds a `Service` with the engine
on a thread of this process (images decoded in its worker pool while the engine runs; requests go into
the engine's continuous batching, identical images share one vision pass through the image-hash cache),
and answers OpenAI batch lines by calling the app's routes in process (httpx's ASGI transport).
`RemoteBackend` posts the same requests to `--url`, with retries and backoff on 429 / 503.
A row's failure is its `error` ("TYPE: message", as the HTTP API names it); nothing here raises for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pydantic import ValidationError

from model.data.image import to_rgb
from model.engine import GenerationResult

from ..errors import TYPES, ApiError, invalid
from ..fetch import fetch_image, is_public
from ..inputs import Prepared, prepare_image
from ..replies import choices_json
from ..schemas import CaptionRequest, VQARequest
from ..settings import Settings
from .sources import Row

BATCH_PRIORITY = -10  # below the default 0 of online traffic: a batch job fills idle capacity


@dataclass
class JobSpec:
    """What to ask of every row. `params`: generation fields of the HTTP API (GenerationParams)."""

    task: str = "caption"  # caption | vqa
    prompt: str | None = None
    question: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = BATCH_PRIORITY

    @property
    def choices(self) -> bool:
        """Rows carry `choices` (n > 1 or logprobs), as the HTTP API's responses do."""
        return self.params.get("n", 1) > 1 or self.params.get("logprobs") is not None

    def body(self, question: str | None) -> CaptionRequest | VQARequest:
        """The request's fields validated as the HTTP API validates them (ApiError 422 naming the field)."""
        fields: dict[str, Any] = {"image": "-", **self.params, "priority": self.priority}
        if self.task == "vqa":
            fields["question"] = question if question is not None else self.question
            if fields["question"] is None:
                raise ApiError(422, "question: none for this row (--question or --question-column)")
        elif self.prompt is not None:
            fields["prompt"] = self.prompt
        try:
            return (VQARequest if self.task == "vqa" else CaptionRequest).model_validate(fields)
        except ValidationError as exc:
            raise invalid(exc.errors()) from None


def error_text(exc: ApiError) -> str:
    return f"{TYPES.get(exc.status, 'error')}: {exc.message}"


def error_row(message: str) -> dict[str, Any]:
    return {"text": None, "finish_reason": None, "error": message}


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ApiError(400, f"image file {str(path)!r} could not be read: {exc.strerror or exc}") from None


async def fetch_url(url: str, settings: Settings, public=is_public) -> bytes:
    """An image URL through the server's SSRF-safe fetcher; refused unless `allow_image_urls`."""
    if not settings.allow_image_urls:
        raise ApiError(400, "image URLs are not fetched unless --allow-image-urls is given")
    max_bytes = int(settings.max_body_mb * (1 << 20))
    return await fetch_image(
        url.strip(), settings.image_url_allowlist, max_bytes, settings.image_url_timeout_s, public
    )


def openai_output(row: Row, status: int | None, body: Any, request_id: str | None) -> dict[str, Any]:
    """One line of OpenAI's batch output for a request line (`status` None: the line was unusable)."""
    out: dict[str, Any] = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": row.key}
    if status is None:
        out.update(response=None, error={"code": "invalid_request", "message": row.error})
    else:
        out.update(response={"status_code": status, "request_id": request_id, "body": body}, error=None)
    return out


class LocalBackend:
    """The model in this process (`Service` with `engine: thread`), or with `--dp N` in N engine
    processes that this job starts and stops (`server.batch.engines`)."""

    def __init__(self, settings: Settings, spec: JobSpec):
        from .engines import build_service

        self.settings = settings
        self.spec = spec
        self.svc = build_service(settings)
        self.http: httpx.AsyncClient | None = None

    @property
    def model_id(self) -> str:
        return self.svc.engine.model_id

    async def start(self) -> None:
        from ..app import create_app
        from .engines import start_service

        await start_service(self.svc)
        await self.svc.warm_up()
        app = create_app(self.settings, self.svc)
        app.state.service = self.svc  # the lifespan that would set it does not run in process
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://blipserve", timeout=None
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        from .engines import stop_service

        await stop_service(self.svc)

    def _prepare(self, image: bytes | Path | np.ndarray) -> Prepared:
        """Read (a file) and decode one image: runs in the service's image pool. A uint8 [H, W, 3] array
        (Ray Data's `read_images`) is taken as decoded pixels."""
        if isinstance(image, np.ndarray):
            return self._prepare_array(image)
        data = read_file(image) if isinstance(image, Path) else image
        return prepare_image(
            data,
            self.svc.engine.image_processor,
            self.settings.max_image_pixels,
            "image",
            self.svc.raw_pixels,
        )

    def _prepare_array(self, array: np.ndarray) -> Prepared:
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ApiError(400, f"image: an array must be uint8 [H, W(, C)], not {array.dtype} {array.shape}")
        processor = self.svc.engine.image_processor
        try:
            image = to_rgb(Image.fromarray(array))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"image: {exc}") from None
        pixels = processor.rgb(image) if self.svc.raw_pixels else processor.preprocess(image)
        return Prepared(pixels, hashlib.sha256(array.tobytes()).hexdigest())

    async def answer(self, row: Row) -> dict[str, Any]:
        """text, finish_reason, error, usage (and choices) of one dataset row."""
        svc = self.svc
        try:
            body = self.spec.body(row.question)
            task = self.spec.task
            svc.require(task, f"/{task}")
            params = svc.sampling_params(body, task)
            image = (
                await fetch_url(row.image, self.settings, svc.is_public)
                if isinstance(row.image, str)
                else row.image
            )
            prepared = await asyncio.get_running_loop().run_in_executor(svc.images, self._prepare, image)
            prompt = svc.vqa_template.format(question=body.question.strip()) if task == "vqa" else body.prompt
            request = svc.make_request(prepared, prompt, params, priority=body.priority)
            outcome = (await svc.generate([request]))[0]
        except ApiError as exc:
            return error_row(error_text(exc))
        return self._result(outcome.result)

    def _result(self, result: GenerationResult) -> dict[str, Any]:
        out: dict[str, Any] = {"text": result.text, "finish_reason": result.finish_reason, "error": None}
        out.update(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        if self.spec.choices:
            out["choices"] = choices_json(self.svc.engine.tokenizer, result.outputs)
        return out

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        """An OpenAI batch line's request through the app's route: (status, JSON body, request id)."""
        r = await self.http.post(url, json=body)
        return r.status_code, r.json(), r.headers.get("x-request-id")


class RemoteBackend:
    """A running server at `url`: `concurrency` requests in flight, 429 / 503 / connection errors
    retried up to `retries` times with exponential backoff (honouring Retry-After)."""

    def __init__(self, url: str, settings: Settings, spec: JobSpec, retries: int = 8, timeout_s: float = 600):
        self.settings = settings
        self.spec = spec
        self.retries = retries
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model_id = url

    async def start(self) -> None:
        r = await self._send("GET", "/v1/models")
        if r.status_code != 200:
            raise ApiError(503, f"{self.http.base_url}: /v1/models answered HTTP {r.status_code}")
        self.model_id = r.json()["data"][0]["id"]

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = await self.http.request(method, path, **kwargs)
                if r.status_code not in (429, 503) or attempt == self.retries:
                    return r
                after = r.headers.get("retry-after", "")
                wait = float(after) if after.replace(".", "", 1).isdigit() else delay
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                wait = delay
            await asyncio.sleep(min(wait, 30.0) * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    async def answer(self, row: Row) -> dict[str, Any]:
        try:
            body = self.spec.body(row.question)
            if isinstance(row.image, Path):
                data = await asyncio.to_thread(read_file, row.image)
            elif isinstance(row.image, str):
                data = await fetch_url(row.image, self.settings)
            else:
                data = row.image
            fields = body.model_dump(exclude={"image", "images", "questions", "stream"}, exclude_none=True)
            form = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items()}
            form = {k: v for k, v in form.items() if k != "stop"}
            if body.stop:
                form["stop"] = body.stop
            r = await self._send("POST", f"/{self.spec.task}", files={"image": ("image", data)}, data=form)
        except ApiError as exc:
            return error_row(error_text(exc))
        except httpx.HTTPError as exc:
            return error_row(f"unavailable: {type(exc).__name__}: {exc}")
        reply = r.json()
        if r.status_code != 200:
            error = reply.get("error", {}) if isinstance(reply, dict) else {}
            return error_row(f"{error.get('type', r.status_code)}: {error.get('message', reply)}")
        out: dict[str, Any] = {
            "text": reply["answer" if self.spec.task == "vqa" else "caption"],
            "finish_reason": reply["finish_reason"],
            "error": None,
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "completion_tokens": reply["usage"]["completion_tokens"],
        }
        if self.spec.choices:
            out["choices"] = reply.get("choices")
        return out

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        r = await self._send("POST", url, json=body)
        return r.status_code, r.json(), r.headers.get("x-request-id")
