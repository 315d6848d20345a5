"""The serving core held on `app.state`: request rules, the engine client, the image worker pool."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from batching import EngineLoop, EngineStopped, QueueFull, Scheduler
from batching.client import EngineClient, InprocClient, SequenceFailed, Ticket
from batching.dp_client import DataParallelClient
from batching.engine_process import (
    EngineHandle,
    EngineProcess,
    engine_loop,
    load_engine,
    pid_alive,
    resolve_device,
)
from batching.metrics import Metrics
from batching.process_client import EngineDied, ProcessClient
from batching.protocol import Done
from model.data.detokenizer import Update
from model.decoding.generation import SamplingError, SamplingParams
from model.frontend import Frontend, GenerationRequest, GenerationResult
from model.runtime.plan import RetrievalOutput, RetrievalRequest
from model.runtime.quant import weight_bytes
from model.runtime.runner import ModelRunner

from .errors import ApiError, Names, in_users_words, named
from .fetch import fetch_field
from .inputs import Prepared, prepare_image
from .schemas import GenerationParams
from .settings import Settings
from .tracing import Tracing

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    result: GenerationResult
    queue_s: float


class Service:
    """What the HTTP routes use: the request rules (`engine`: a `Frontend`, with tokenizer, image
    processor and prompt rules and no model in process mode; the `Blip2Engine` with `engine: thread`)
    and a client of the engine (`client`), in this process (`engine: thread`) or in an engine process
    of its own (`engine: process`, the default)."""

    def __init__(
        self,
        settings: Settings,
        engine: Frontend,
        client: EngineClient,
        owner: EngineProcess | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.client = client
        client.use_tokenizer(engine.tokenizer)  # the text of generated tokens is made in this process
        self.owner = owner  # the engine process this HTTP process started (stopped with it)
        self.max_len = min(settings.max_len, engine.max_positions)
        self.images = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blipserve-img")
        self.ready = False
        self.raw_pixels = False  # set by `start` from the engine's device
        self.created = int(time.time())  # /v1/models: when this model was loaded
        self.tracing: Tracing | None = None  # set by the app when tracing is on

    @classmethod
    def build(cls, settings: Settings, handle: EngineHandle | list[EngineHandle] | None = None) -> Service:
        """Load the model here (`engine: thread`), or start an engine process (or use `handle`'s; a list
        of handles: --dp engines, each request to the least loaded)."""
        # PIL's own decompression-bomb limit as an error, never just a warning (our pixel cap comes first).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if settings.engine == "thread" and handle is None:
            engine = load_engine(settings)
            metrics = Metrics()
            return cls(settings, engine, InprocClient(engine_loop(settings, engine, metrics), metrics))
        owner = None
        if handle is None and settings.data_parallel_size > 1:
            from batching.engine_group import EngineGroup

            owner = EngineGroup(settings)
            handle = owner.start()
        if isinstance(handle, list) and len(handle) > 1:
            frontend = Frontend.from_dir(Path(handle[0].root), handle[0].model_id)
            client = DataParallelClient(handle, settings.dp_routing, settings.min_ready_engines)
            return cls(settings, frontend, client, owner)
        if isinstance(handle, list):
            handle = handle[0]
        if handle is None:
            owner = EngineProcess(settings)
            handle = owner.start()
        alive = owner.alive if owner is not None else (lambda: pid_alive(handle.pid))
        frontend = Frontend.from_dir(Path(handle.root), handle.model_id)
        return cls(settings, frontend, ProcessClient(handle.address, alive), owner)

    @property
    def loop(self) -> EngineLoop:
        """The in-process engine loop (`engine: thread`), for tests that reach into it."""
        return self.client.loop

    @property
    def runner(self) -> ModelRunner:
        return self.client.loop.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.client.loop.scheduler

    @property
    def healthy(self) -> bool:
        return self.client.healthy

    async def start(self) -> None:
        """Capture the decode graphs and start the engine thread, or wait for the engine process(es)."""
        if isinstance(self.client, ProcessClient | DataParallelClient):
            info = await self.client.connect()
            self.device, self.dtype, self.weight_bytes = info.device, info.dtype, info.weight_bytes
        else:
            await asyncio.to_thread(self.client.loop.runner.prepare)
            self.client.start()
            self.device, self.dtype = str(self.engine.device), str(self.engine.dtype).removeprefix("torch.")
            self.weight_bytes = weight_bytes(self.engine.model)
        # A CUDA engine takes pixels before normalising (uint8, a quarter of the bytes to pass and copy
        # up) and normalises them on the device; a CPU engine would only do here what this process does.
        raw = self.settings.raw_pixels
        self.raw_pixels = self.device.startswith("cuda") if raw is None else raw

    async def warm_up(self) -> None:
        """One request through every stage before taking traffic (allocations, kernels, lazy init)."""
        side = self.engine.image_processor
        pixels = torch.zeros(3, side.height, side.width)
        if "match" in self.engine.tasks:
            request = self.engine.retrieval_request("match", pixels, "warmup", ["warm up"])
        else:
            params = SamplingParams(max_new_tokens=2, num_beams=min(2, self.settings.max_running_seqs))
            request = self.engine.request(pixels, "warmup", "warm up", params)
        await self.client.submit(request)  # through the serving path itself: client, loop, runner, cache
        self.ready = True

    async def shutdown(self) -> None:
        """Finish every accepted request, then stop the engine (thread, or the process we started)."""
        self.ready = False
        timeout = self.settings.graceful_timeout_s
        if isinstance(self.client, ProcessClient | DataParallelClient):
            await self.client.close()  # first: the engine's exit below is no death to report
            if self.owner is not None:
                await asyncio.to_thread(self.owner.stop, timeout)
        else:
            await asyncio.to_thread(self.client.shutdown, timeout)
        self.images.shutdown(wait=False, cancel_futures=True)
        log.info("engine stopped; %d requests left unfinished", self.client.pending)

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        self.client.record_http(endpoint, status, seconds)

    async def render_metrics(self) -> bytes:
        return await self.client.metrics_text()

    @property
    def vqa_template(self) -> str:
        return self.settings.vqa_template or self.engine.vqa_template

    def require(self, task: str, route: str) -> None:
        """400 when the loaded checkpoint does not do `task` (a VQA model asked for a caption...)."""
        tasks = self.engine.tasks
        if task not in tasks:
            raise ApiError(
                400,
                f"{route}: model {self.engine.model_id} does not serve {task!r} (it serves: "
                f"{', '.join(tasks)})",
                code="unsupported_task",
            )

    def sampling_params(
        self, p: GenerationParams, task: str = "caption", names: Names | None = None
    ) -> SamplingParams:
        """The request's generation settings within this server's limits; 422 naming the field as the
        route's user sent it (`names`: {our field: theirs}, where they differ)."""
        s = self.settings
        default = s.vqa_max_new_tokens if task == "vqa" and s.vqa_max_new_tokens else None
        max_new = p.max_new_tokens or default or s.default_max_new_tokens
        beams = p.num_beams or s.default_num_beams

        def refuse(field: str, problem: str) -> ApiError:
            name = named(field, names)
            return ApiError(422, f"{name}: {in_users_words(problem, names)}", param=name)

        if max_new > s.max_new_tokens_limit:
            raise refuse("max_new_tokens", f"at most {s.max_new_tokens_limit} on this server")
        if beams > s.max_beams:
            raise refuse("num_beams", f"at most {s.max_beams} on this server")
        if p.n > s.max_n:
            raise refuse("n", f"at most {s.max_n} on this server")
        fields = p.model_dump(
            exclude={"max_new_tokens", "num_beams", "stream", "stop"},
            include=set(GenerationParams.model_fields),
        )
        stop = tuple(p.stop or ())
        try:  # the rules of the settings together (min_new_tokens, do_sample, n) are SamplingParams'
            return SamplingParams(max_new_tokens=max_new, num_beams=beams, stop=stop, **fields)
        except SamplingError as exc:
            raise refuse(exc.field, exc.problem) from None

    async def fetch(self, item: bytes | str, field: str = "image") -> bytes:
        """The image's bytes: `item` itself, or fetched from its URL (`field`: where the user sent it)."""
        return item if isinstance(item, bytes) else await fetch_field(item, field, self.settings)

    def limit_items(self, count: int, field: str) -> None:
        """422 when a batch request carries more than `max_items_per_request` of `field`."""
        if count > self.settings.max_items_per_request:
            limit = self.settings.max_items_per_request
            raise ApiError(422, f"{field}: at most {limit} per request", param=field)

    async def prepare_images(
        self, items: list[bytes | str], fields: list[str] | None = None, names: Names | None = None
    ) -> list[Prepared]:
        """Fetch, decode and preprocess a request's images in the worker pool; `fields`: each image's
        field as sent, `names`: the route's names for ours (for the errors). Traced as "preprocess"."""
        if self.tracing is None:
            return await self._prepare_images(items, fields, names)
        with self.tracing.span("preprocess"):
            prepared = await self._prepare_images(items, fields, names)
        self.tracing.record_images([p.size for p in prepared])
        return prepared

    async def _prepare_images(
        self, items: list[bytes | str], fields: list[str] | None, names: Names | None
    ) -> list[Prepared]:
        self.limit_items(len(items), named("images", names))
        fields = fields or [f"images[{i}]" if len(items) > 1 else "image" for i in range(len(items))]
        blobs = await asyncio.gather(
            *(self.fetch(item, field) for item, field in zip(items, fields, strict=True))
        )
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self.images,
                prepare_image,
                data,
                self.engine.image_processor,
                self.settings.max_image_pixels,
                field,
                self.raw_pixels,
            )
            for field, data in zip(fields, blobs, strict=True)
        ]
        return list(await asyncio.gather(*jobs))

    def make_request(
        self,
        image: Prepared,
        prompt: str | None,
        params: SamplingParams,
        names: Names | None = None,
        priority: int = 0,
    ) -> GenerationRequest:
        """The engine request; 422 when the prompt is too long, naming the fields as the route's user
        sent them (`names`: e.g. {"prompt": "question"} on /vqa); `priority`: the scheduler admits
        higher ones first (see `batching.scheduler`)."""
        where = named("prompt", names)
        try:  # tokenized once, here: the engine takes the ids as they are
            inputs = self.engine.processor.prompt(prompt)
            if prompt is not None and inputs.text_tokens > self.settings.max_prompt_tokens:
                raise ValueError(f"prompt: longer than {self.settings.max_prompt_tokens} tokens")
            request = self.engine.request(image.pixel_values, image.key, inputs, params)
        except ValueError as exc:  # in the Python API's words ("prompt", "max_new_tokens")
            raise ApiError(422, in_users_words(str(exc), names), param=where) from None
        if request.positions > self.max_len:
            problem = f"prompt + max_new_tokens exceed this server's {self.max_len} positions"
            raise ApiError(422, in_users_words(problem, names), param=where)
        request.priority = priority
        return request

    async def enqueue(self, request: GenerationRequest | RetrievalRequest, stream: bool = False) -> Ticket:
        """Queue one request now (so a full queue is a 429 before any response starts)."""
        if not self.ready:
            raise ApiError(503, "model is not ready", {"Retry-After": "1"})
        try:
            trace = self.tracing is not None and self.tracing.recording()
            return await self.client.add(request, self.settings.request_timeout_s, stream, trace)
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", {"Retry-After": "1"}) from None
        except (EngineStopped, EngineDied) as exc:
            raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None

    async def enqueue_all(self, requests: list) -> list[Ticket]:
        """Queue every request, or none: on the first refusal the ones queued are cancelled."""
        tickets: list[Ticket] = []
        try:
            for r in requests:
                tickets.append(await self.enqueue(r))
        except BaseException:
            for t in tickets:
                self.client.cancel(t)
            raise
        return tickets

    async def generate(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """Run requests concurrently; the first failure cancels the others and maps to an HTTP error."""
        tickets = await self.enqueue_all(requests)
        tasks = [asyncio.ensure_future(self.outcome(r, t)) for r, t in zip(requests, tickets, strict=True)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def finished(self, ticket: Ticket) -> Done:
        """The request's result once done; a timeout is a 504, a dead engine a 503, else a 500. Traced:
        its engine stages become spans."""
        try:
            done = await self.client.wait(ticket)
            if self.tracing is not None:
                self.tracing.engine_spans(done)
            return done
        except SequenceFailed as exc:
            if self.tracing is not None:
                self.tracing.engine_spans(exc.done)
            if exc.reason == "timeout":
                raise ApiError(
                    504, f"request did not finish within {self.settings.request_timeout_s}s"
                ) from None
            if exc.reason == "engine_died":
                raise ApiError(
                    503, "the engine process died; the server restarts", {"Retry-After": "5"}
                ) from None
            raise ApiError(500, "the request failed in the engine") from None

    async def outcome(self, request: GenerationRequest, ticket: Ticket) -> Outcome:
        done = await self.finished(ticket)
        texts = ticket.text.texts() if ticket.text is not None else None  # made as the tokens came
        if self.tracing is None:
            return Outcome(self.engine.result(request, done.outputs, texts), done.queue_s)
        with self.tracing.span("detokenize"):
            result = self.engine.result(request, done.outputs, texts)
        self.tracing.record_usage(result.prompt_tokens, result.completion_tokens)
        return Outcome(result, done.queue_s)

    def retrieval_request(self, task: str, image: Prepared | None, texts: list[str]) -> RetrievalRequest:
        pixels, key = (image.pixel_values, image.key) if image is not None else (None, "")
        try:
            limit = self.settings.max_prompt_tokens
            return self.engine.retrieval_request(task, pixels, key, texts, limit)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None

    async def retrieve(self, requests: list[RetrievalRequest]) -> list[RetrievalOutput]:
        """Queue matching / embedding requests (one engine step each, batched with the others)."""
        tickets = await self.enqueue_all(requests)
        try:
            return [(await self.finished(t)).retrieval for t in tickets]
        except BaseException:
            for t in tickets:
                self.client.cancel(t)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[Update] | Outcome]:
        """Queue a request (errors raise here), then iterate: the outputs' updates after each engine step
        (new text, tokens, log-probabilities), the last ones with their finish reasons, and last the
        Outcome. Closing the iterator early cancels the request and frees its slots."""
        ticket = await self.enqueue(request, stream=True)
        return self._events(request, ticket)

    async def _events(
        self, request: GenerationRequest, ticket: Ticket
    ) -> AsyncIterator[list[Update] | Outcome]:
        events = ticket.progress
        done = asyncio.ensure_future(self.outcome(request, ticket))
        span = self.tracing.start_span("stream") if self.tracing is not None else None
        try:
            while not done.done() or not events.empty():
                if events.empty():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    yield getter.result()
                else:
                    yield events.get_nowait()
            yield done.result()
        finally:
            if span is not None:
                if not done.done():  # the client went away: the request is cancelled
                    span.set_attribute("blipserve.finish_reason", "cancelled")
                span.end()
            if not done.done():
                done.cancel()
                self.client.cancel(ticket)


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


__all__ = ["Outcome", "Service", "elapsed_ms", "resolve_device"]
