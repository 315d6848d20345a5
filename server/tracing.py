"""OpenTelemetry tracing of requests (`--otlp-traces-endpoint`; off by default, and then nothing here runs).

One trace per HTTP request, its spans exported over OTLP/HTTP by the OpenTelemetry SDK:

    "POST /caption"      SERVER span of the HTTP process; continues an incoming W3C `traceparent`
    ├── preprocess       fetching, decoding and resizing the images (HTTP process)
    ├── engine           one per engine request (per image), [arrived at the engine, finished]:
    │   ├── queue        waiting for a place in a step
    │   ├── vision       ViT + Q-Former of its image (in the background, or inside its first step)
    │   ├── prefill      its prompt's forward pass, up to its first token
    │   ├── decode       one token per step, first token to the last
    │   ├── retrieval    /match, /embed, /v1/embeddings: the ITM / ITC heads
    │   └── scoring      `candidates`: their prompt's prefill and the candidates' forward
    └── detokenize       token ids to text (or `stream`: the Server-Sent Events, first to last)

The engine process exports nothing: with `trace` in its `Add`, it sends each request's stage timestamps
back in the `Done` (`batching.protocol.Done.timestamps`, the engine's clock, seconds since the Unix
epoch), and the HTTP process makes them child spans with those start and end times. The request span
carries the model (`gen_ai.request.model`), the tokens (`gen_ai.usage.input_tokens`, `...output_tokens`:
prompt and completion tokens over its images) and the images' sizes (`blipserve.image.width` / `height`,
one per image, before resizing). Its trace id goes into the access log line (`trace_id`).

The SDK is an optional extra (`pip install 'blipserve[otel]'`); this module imports it only when tracing
is on. Besides the flag, the standard variables apply: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
(the service name defaults to "blipserve"), `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` / `_TIMEOUT` /
`_COMPRESSION` / `_CERTIFICATE`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*` (the batch span processor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .routes import concrete_routes
from .settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from batching.protocol import Done

MISSING_SDK = (
    "--otlp-traces-endpoint needs the OpenTelemetry SDK and its OTLP/HTTP exporter: "
    "pip install 'blipserve[otel]'"
)
# Engine stages, as child spans of the "engine" span: (name, start stamp, end stamp).
ENGINE_STAGES = (
    ("queue", "arrived", "admitted"),
    ("vision", "vision_start", "vision_end"),
    ("prefill", "prefill_start", "prefill_end"),
    ("decode", "prefill_end", "finished"),
    ("retrieval", "retrieval_start", "finished"),
)
INPUT_TOKENS, OUTPUT_TOKENS = "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"
# Probes and scrapes, every few seconds: no trace of their own.
UNTRACED = frozenset({"/health", "/ready", "/metrics"})


def sdk_available() -> bool:
    """Whether the OpenTelemetry SDK and its OTLP/HTTP span exporter can be imported."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` cannot be an OTLP/HTTP URL (None when it can)."""
    url = urlsplit(endpoint.strip())
    if url.scheme not in ("http", "https") or not url.netloc:
        return f"--otlp-traces-endpoint {endpoint}: expected an http(s) URL, e.g. http://collector:4318/v1/traces"
    return None


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: `endpoint` as given, or with /v1/traces when it has no path."""
    url = endpoint.strip()
    return url.rstrip("/") + "/v1/traces" if urlsplit(url).path in ("", "/") else url


class Tracing:
    """The tracer of one HTTP process: spans of its requests, exported by `provider`'s processors."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("blipserve")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """A tracer exporting to `settings.otlp_traces_endpoint` in batches, or None when that is unset.
        Raises RuntimeError (MISSING_SDK) without the `otel` extra."""
        if not settings.otlp_traces_endpoint:
            return None
        if not sdk_available():
            raise RuntimeError(MISSING_SDK)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "blipserve"}))
        provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=traces_url(settings.otlp_traces_endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter."""
        self.provider.shutdown()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[Span]:
        """A child span of the current one (the request's), current inside the block."""
        with self.tracer.start_as_current_span(name) as span:
            yield span

    def recording(self) -> bool:
        """Whether the current span records (False when the sampler dropped the trace: then the engine
        is not asked for its timestamps)."""
        return _current_span() is not None

    def start_span(self, name: str) -> Span:
        """A child span of the current one, not made current: the caller ends it (`Span.end`)."""
        return self.tracer.start_span(name)

    def engine_spans(self, done: Done) -> None:
        """The "engine" span of one engine request and its stage spans, children of the current span,
        at the times the engine reported (`done.timestamps`; nothing without them)."""
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        stamps = done.timestamps
        if "arrived" not in stamps or "finished" not in stamps:
            return
        ns = {k: int(v * 1e9) for k, v in stamps.items()}
        engine = self.tracer.start_span("engine", start_time=ns["arrived"])
        engine.set_attribute("blipserve.finish_reason", done.finish_reason)
        if not done.ok:
            engine.set_status(Status(StatusCode.ERROR, done.finish_reason))
        inside = trace.set_span_in_context(engine)
        for name, start, end in ENGINE_STAGES:
            if start in ns and end in ns and ns[end] >= ns[start]:
                if name == "decode" and ns[end] == ns[start]:
                    continue  # its first token was its last: no decode step
                if name == "retrieval" and done.scores is not None:
                    name = "scoring"  # candidates: the prefill and the candidates' forward
                stage = self.tracer.start_span(name, context=inside, start_time=ns[start])
                stage.end(end_time=ns[end])
        engine.end(end_time=ns["finished"])

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Add one engine request's token counts to the current (request) span's."""
        span = _current_span()
        if span is None:
            return
        attributes = getattr(span, "attributes", None) or {}
        span.set_attribute(INPUT_TOKENS, attributes.get(INPUT_TOKENS, 0) + prompt_tokens)
        span.set_attribute(OUTPUT_TOKENS, attributes.get(OUTPUT_TOKENS, 0) + completion_tokens)

    def record_images(self, sizes: list[tuple[int, int]]) -> None:
        """The request's images' (width, height) in pixels, before resizing, on the current span."""
        span = _current_span()
        if span is not None and sizes:
            span.set_attribute("blipserve.image.width", [w for w, _ in sizes])
            span.set_attribute("blipserve.image.height", [h for _, h in sizes])


def _current_span() -> Any:
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


class TraceRequests:
    """Pure ASGI middleware (outside `Observe`): one SERVER span per HTTP request, continuing an incoming
    W3C `traceparent` / `tracestate`; its trace id goes into the scope's state for the access log.
    Health probes and metric scrapes (`UNTRACED`) pass through untraced."""

    def __init__(self, app: ASGIApp, tracing: Tracing):
        self.app = app
        self.tracing = tracing
        self._routes: set[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNTRACED:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = scope.get("headers") or []
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.startswith(b"trace")}
        parent = self.tracing.propagator.extract(carrier) if carrier else None
        method, path = scope.get("method", ""), scope.get("path", "")
        app = scope["app"]
        if self._routes is None:
            self._routes = {getattr(r, "path", "") for r in concrete_routes(app.routes)}
        # The route in the name where there is one; an unknown path (a 404) must not make a name per URL.
        name = f"{method} {path}" if path in self._routes else method
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
        svc = getattr(app.state, "service", None)
        if svc is not None:
            attributes["gen_ai.request.model"] = svc.engine.model_id
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracing.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            scope.setdefault("state", {})["trace_id"] = format(span.get_span_context().trace_id, "032x")
            try:
                await self.app(scope, receive, send_status)
            finally:
                span.set_attribute("http.response.status_code", status)
                request_id = scope["state"].get("request_id")  # set by Observe, inside
                if request_id:
                    span.set_attribute("blipserve.request_id", request_id)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
