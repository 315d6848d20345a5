"""Spans as the tests read them, from the SDK's in-memory exporter or from a real OTLP/HTTP receiver on
127.0.0.1 (protobuf over HTTP, as the OTLP exporter sends them), and the tree helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from live import free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TOLERANCE_NS = 2_000_000  # the engine's clock (monotonic + offset) against the HTTP process's time_ns


@dataclass
class S:
    """A span as both exporters give it: ids as ints, times in ns since the epoch."""

    name: str
    trace_id: int
    span_id: int
    parent: int | None
    start: int
    end: int
    attributes: dict = field(default_factory=dict)
    server: bool = False


def from_sdk(span) -> S:
    parent = span.parent.span_id if span.parent is not None else None
    c = span.context
    attrs = dict(span.attributes or {})
    return S(
        span.name, c.trace_id, c.span_id, parent, span.start_time, span.end_time, attrs, span.kind.value == 1
    )


def _any(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_any(v) for v in value.array_value.values)
    return getattr(value, kind)


def from_proto(span) -> S:
    parent = int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None
    attrs = {a.key: _any(a.value) for a in span.attributes}
    return S(
        span.name,
        int.from_bytes(span.trace_id, "big"),
        int.from_bytes(span.span_id, "big"),
        parent,
        span.start_time_unix_nano,
        span.end_time_unix_nano,
        attrs,
        span.kind == 2,  # SPAN_KIND_SERVER
    )


def children(spans: list[S], parent: S) -> list[S]:
    return sorted((s for s in spans if s.parent == parent.span_id), key=lambda s: s.start)


def within(inner: S, outer: S) -> bool:
    return outer.start - TOLERANCE_NS <= inner.start <= inner.end <= outer.end + TOLERANCE_NS


class Receiver(ThreadingHTTPServer):
    """Accepts OTLP/HTTP protobuf exports on POST /v1/traces and keeps their spans."""

    def __init__(self, port: int):
        self.spans: list[S] = []
        self.resources: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path != "/v1/traces" or self.headers["content-type"] != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        export = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for rs in export.resource_spans:
                self.server.resources.append({a.key: _any(a.value) for a in rs.resource.attributes})
                self.server.spans += [from_proto(s) for ss in rs.scope_spans for s in ss.spans]
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def receiver() -> Iterator[tuple[str, Receiver]]:
    port = free_port()
    server = Receiver(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.shutdown()
        server.server_close()


def wait_for(server: Receiver, name: str, timeout: float = 20.0) -> list[S]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.lock:
            spans = list(server.spans)
        if any(s.server and s.name == name for s in spans):
            return spans
        time.sleep(0.05)
    raise TimeoutError(f"no {name!r} span exported")
