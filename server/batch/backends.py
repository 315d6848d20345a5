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
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from pydantic import ValidationError

from model.decoding.generation import SamplingParams
from model.engine import GenerationResult

from ..errors import TYPES, ApiError, invalid
from ..fetch import fetch_within
from ..inputs import Prepared
from ..replies import choices_json
from ..schemas import CaptionRequest, VQARequest
from ..settings import Settings
from .sources import Row

RETRY_STATUS = (429, 502, 503)  # queue full; a load balancer's server restarting; server not ready
BATCH_PRIORITY = -10  # below the default 0 of online traffic: a batch job fills idle capacity


class Unreachable(Exception):
    """The server (--url) could not be reached, or stayed full or unavailable, through every retry: not
    the row's fault. The job stops as on SIGTERM, without recording the row (a rerun sends it again)."""


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


def torch_threads(settings: Settings) -> int:
    """torch CPU threads for a job with the model in this process: `engine_threads`, else the cores less
    one (the image pool decodes on it), as the engine process takes the cores its HTTP processes leave.
    torch's own default (every core) makes the engine's OpenMP team spin against the image threads."""
    return settings.engine_threads or max(1, (os.cpu_count() or 1) - 1)


def error_text(exc: ApiError) -> str:
    return f"{TYPES.get(exc.status, 'error')}: {exc.message}"


def error_row(message: str) -> dict[str, Any]:
    """A failed row: the same fields as an answered one (null), and why."""
    return {
        "text": None,
        "finish_reason": None,
        "error": message,
        "prompt_tokens": None,
        "completion_tokens": None,
    }


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ApiError(400, f"image file {str(path)!r} could not be read: {exc.strerror or exc}") from None


async def fetch_url(url: str, settings: Settings) -> bytes:
    """An image URL through the server's SSRF-safe fetcher; refused unless `allow_image_urls`."""
    if not settings.allow_image_urls:
        raise ApiError(400, "image URLs are not fetched unless --allow-image-urls is given")
    return await fetch_within(url, settings)


def openai_output(row: Row, status: int | None, body: Any, request_id: str | None) -> dict[str, Any]:
    """One line of OpenAI's batch output for a request line (`status` None: the line was unusable)."""
    if status is None:
        return openai_error(row.key, "invalid_request", row.error or "the line is unusable")
    out: dict[str, Any] = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": row.key}
    out.update(response={"status_code": status, "request_id": request_id, "body": body}, error=None)
    return out


def openai_error(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """An OpenAI batch output line for a request that got no response: `error` {code, message}."""
    out: dict[str, Any] = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id}
    out.update(response=None, error={"code": code, "message": message})
    return out


def json_reply(r: httpx.Response) -> tuple[int, Any]:
    """(status, JSON body) of a route's reply. One that is not JSON (a stream of events, a proxy's
    error page) is an error body, `bad_gateway` (502) when its status said success: never a 200 row."""
    try:
        return r.status_code, r.json()
    except ValueError:
        status = r.status_code if r.status_code >= 400 else 502
        kind = r.headers.get("content-type", "no content type").split(";")[0]
        message = f"HTTP {r.status_code} answered {kind}, not JSON"
        return status, {"error": {"type": TYPES.get(status, "bad_gateway"), "message": message}}


class LocalBackend:
    """The model in this process (`Service` with `engine: thread`), or with `--dp N` in N engine
    processes that this job starts and stops (`server.batch.engines`)."""

    def __init__(self, settings: Settings, spec: JobSpec):
        from .engines import build_service

        self.settings = settings
        self.spec = spec
        self.svc = build_service(settings)
        self.http: httpx.AsyncClient | None = None
        self._job_options: tuple[str | None, SamplingParams, int] | None = None

    @property
    def model_id(self) -> str:
        return self.svc.engine.model_id

    async def start(self, check: bool = True) -> None:
        """Start the engine; with `check`, the job's options against the model (ApiError: see `check`)."""
        from ..app import create_app
        from .engines import start_service

        await start_service(self.svc)
        await self.svc.warm_up()
        if check:
            self.check()
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

    def check(self) -> None:
        """The task, generation options and prompt as every row meets them (the question: --question, or
        "?" when rows carry theirs): a model that does not serve the task, an option past this server's
        limits or a prompt too long is one ApiError here, not the same error on every row."""
        svc, spec = self.svc, self.spec
        body = spec.body(spec.question or "?")
        svc.rules.require(spec.task, f"--task {spec.task}")
        params = svc.rules.sampling_params(body, spec.task)
        prompt = (
            svc.rules.vqa_template.format(question=body.question.strip())
            if spec.task == "vqa"
            else body.prompt
        )
        side = svc.engine.image_processor
        svc.rules.make_request(Prepared(torch.zeros(3, side.height, side.width), "check"), prompt, params)

    def _prepare(self, image: bytes | Path | np.ndarray) -> Prepared:
        """Read (a file) and decode one image: runs in the service's image pool. A uint8 [H, W, 3] array
        (Ray Data's `read_images`) is taken as decoded pixels."""
        if isinstance(image, np.ndarray):
            return self.svc.images.decode_array(image)
        return self.svc.images.decode(read_file(image) if isinstance(image, Path) else image)

    async def answer(self, row: Row) -> dict[str, Any]:
        """text, finish_reason, error, usage (and choices) of one dataset row."""
        svc = self.svc
        try:
            prompt, params, priority = self._options(row.question)
            image = await fetch_url(row.image, self.settings) if isinstance(row.image, str) else row.image
            prepared = await svc.images.run(self._prepare, image)
            request = svc.rules.make_request(prepared, prompt, params, priority=priority)
            ticket = await svc.enqueue(request)  # Service.generate for one request, without its gather
            try:
                outcome = await svc.outcome(request, ticket)
            except BaseException:
                svc.client.cancel(ticket)
                raise
        except ApiError as exc:
            return error_row(error_text(exc))
        return self._result(outcome.result)

    def _options(self, question: str | None) -> tuple[str | None, SamplingParams, int]:
        """(prompt, sampling parameters, priority) of a row: validated as the HTTP API validates a
        request; computed once for the rows without a question of their own (ApiError)."""
        if question is None and self._job_options is not None:
            return self._job_options
        svc, task = self.svc, self.spec.task
        body = self.spec.body(question)
        svc.rules.require(task, f"/{task}")
        params = svc.rules.sampling_params(body, task)
        prompt = (
            svc.rules.vqa_template.format(question=body.question.strip()) if task == "vqa" else body.prompt
        )
        options = (prompt, params, body.priority)
        if question is None:
            self._job_options = options
        return options

    def _result(self, result: GenerationResult) -> dict[str, Any]:
        out: dict[str, Any] = {"text": result.text, "finish_reason": result.finish_reason, "error": None}
        out.update(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        if self.spec.choices:
            out["choices"] = choices_json(self.svc.engine.tokenizer, result.outputs)
        return out

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        """An OpenAI batch line's request through the app's route: (status, JSON body, request id)."""
        r = await self.http.post(url, json=body)
        return *json_reply(r), r.headers.get("x-request-id")


def check_limits(model: dict[str, Any], spec: JobSpec, where: str) -> None:
    """The job's task and options against what a server's `/v1/models` entry reports (`tasks`,
    `limits`); ApiError naming the option. The server checks each request again."""
    tasks = model.get("tasks") or []
    if tasks and spec.task not in tasks:
        raise ApiError(
            400, f"--task {spec.task}: {where} serves {model['id']}, which does {', '.join(tasks)}"
        )
    limits = model.get("limits") or {}
    for option, limit in (("max_new_tokens", "max_new_tokens"), ("num_beams", "max_beams"), ("n", "max_n")):
        value, cap = spec.params.get(option), limits.get(limit)
        if value is not None and cap is not None and value > cap:
            raise ApiError(422, f"{option}: at most {cap} on {where}")


class RemoteBackend:
    """A running server at `url`: `concurrency` requests in flight, 429 / 502 / 503 / connection errors
    retried up to `retries` times with exponential backoff (honouring Retry-After), then Unreachable."""

    def __init__(self, url: str, settings: Settings, spec: JobSpec, retries: int = 8, timeout_s: float = 600):
        self.settings = settings
        self.spec = spec
        self.retries = retries
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model_id = url

    async def start(self, check: bool = True) -> None:
        """Reach the server (a few retries); with `check`, the job's task and options against the limits
        it reports. ApiError, in one line, when it cannot be reached, is not a blipserve server or
        refuses the options."""
        where = f"--url {self.http.base_url}"
        try:
            r = await self._send("GET", "/v1/models", retries=min(self.retries, 2))
        except Unreachable as exc:
            raise ApiError(503, f"cannot reach the server: {exc}") from None
        except httpx.HTTPError as exc:
            raise ApiError(503, f"{where}: {type(exc).__name__}: {exc}") from None
        if r.status_code == 401:
            given = (
                "refused the API key given" if "authorization" in self.http.headers else "wants an API key"
            )
            raise ApiError(401, f"{where}: the server {given} (--api-key, or BLIPSERVE_API_KEY)")
        try:
            model = r.json()["data"][0] if r.status_code == 200 else None
            self.model_id = model["id"]
        except (ValueError, LookupError, TypeError):
            raise ApiError(
                502, f"{where}: GET /v1/models answered HTTP {r.status_code}, not a blipserve model list"
            ) from None
        if check:
            check_limits(model, self.spec, where)

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(
        self, method: str, path: str, retries: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """The response; Unreachable once `retries` retries of a lost connection or a 429 / 502 / 503
        (honouring Retry-After; else 0.5 s doubling up to 30 s) have failed."""
        retries = self.retries if retries is None else retries
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                r = await self.http.request(method, path, **kwargs)
                if r.status_code not in RETRY_STATUS:
                    return r
                after = r.headers.get("retry-after", "")
                wait = float(after) if after.replace(".", "", 1).isdigit() else delay
                why = f"HTTP {r.status_code}"
            except httpx.TransportError as exc:
                wait, why = delay, f"{type(exc).__name__}: {exc}"
            if attempt == retries:
                raise Unreachable(f"--url {self.http.base_url}: no answer after {retries} retries ({why})")
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
        except httpx.HTTPError as exc:  # not a transport error (those are retried): e.g. a bad redirect
            return error_row(f"unavailable: {type(exc).__name__}: {exc}")
        try:
            reply = r.json()
        except ValueError:  # not the server's JSON (a proxy's error page)
            return error_row(f"{TYPES.get(r.status_code, r.status_code)}: HTTP {r.status_code}, not JSON")
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
        return *json_reply(r), r.headers.get("x-request-id")
