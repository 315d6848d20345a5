"""OpenTelemetry tracing: the engine's stage times, the span tree of a request (in-memory exporter, engine
thread) and across processes (a real OTLP/HTTP receiver on 127.0.0.1, engine process), the access log's
trace id, the continued W3C traceparent, and the one-line error without the SDK."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from live import b64, png_bytes, serve_in_process, serve_in_thread
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_spans import TOLERANCE_NS, S, children, from_sdk, receiver, wait_for, within
from test_batching import EOS, FakeRunner, request
from test_server import gated_service

from batching import Scheduler
from batching.client import done_of
from model.runtime.plan import RetrievalOutput, RetrievalRequest
from server.app import create_app
from server.logs import JsonFormatter
from server.settings import Settings
from server.startup import StartupError, check
from server.tracing import MISSING_SDK, Tracing, traces_url

TRACE_ID, PARENT_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


# The engine's stage times, on the scheduler with known clocks.


def _step(sched: Scheduler, now: float, started: float, **timings) -> list:
    plan, _ = sched.schedule(now=started)
    # One fake runner per scheduler: it learns each sequence's script at its prefill.
    runner = sched.__dict__.setdefault("fake_runner", FakeRunner())
    out = runner.run(plan)
    for k, v in timings.items():
        setattr(out, k, v)
    return sched.postprocess(plan, out, now=now, started=started)


def test_stage_times_with_vision_inside_the_step():
    sched = Scheduler(4, 8, 4, (EOS,), background_vision=False)
    seq = sched.add(request(3))
    seq.arrived, seq.trace = 9.0, True
    _step(sched, 11.0, 10.0, vision_in_step=True, vision_s=0.5, prefill_s=0.25, decode_s=0.1)
    assert seq.admitted == 10.0 and seq.vision_span == (10.0, 10.5) and seq.work_span == (10.5, 10.75)
    assert _step(sched, 12.0, 11.5) == [] and _step(sched, 13.0, 12.5) == []
    assert _step(sched, 14.0, 13.5) == [seq]  # 3 tokens, then EOS
    assert seq.finished_at == 14.0
    stamps = done_of(seq).timestamps
    offset = stamps["arrived"] - 9.0
    assert abs(offset - (time.time() - time.monotonic())) < 1e-3
    want = {"arrived": 9, "admitted": 10, "vision_start": 10, "vision_end": 10.5}
    want |= {"prefill_start": 10.5, "prefill_end": 10.75, "finished": 14}
    assert stamps.keys() == want.keys()
    assert all(abs(stamps[k] - offset - v) < 1e-6 for k, v in want.items())


def test_stage_times_with_background_vision_and_untraced():
    sched = Scheduler(4, 8, 4, (EOS,), background_vision=True)
    seq, other = sched.add(request(2, "a")), sched.add(request(2, "b"))
    seq.trace = True
    _step(sched, 10.4, 10.0)  # admitted; the vision batch is in flight: FakeRunner reports it encoded
    assert seq.vision_span == (10.0, 10.4) and seq.work_span is None
    _step(sched, 11.0, 10.5, prefill_s=0.2)
    assert seq.vision_span == (10.0, 10.4) and seq.work_span == (10.5, 10.7)
    assert done_of(other).timestamps == {}  # not traced: nothing sent


def test_stage_times_of_a_retrieval():
    sched = Scheduler(4, 8, 4, (EOS,), background_vision=False)
    seq = sched.add(RetrievalRequest("embed", None, "k", [[1, 2]]))
    seq.trace = True
    plan, _ = sched.schedule(now=20.0)
    out = FakeRunner().run(plan)
    out.retrievals = {seq.seq_id: RetrievalOutput()}
    out.vision_in_step, out.vision_s, out.prefill_s, out.decode_s = True, 0.1, 0.2, 0.3
    assert sched.postprocess(plan, out, now=21.0, started=20.0) == [seq]
    assert seq.vision_span == (20.0, 20.1) and seq.work_span == (pytest.approx(20.6), 21.0)
    stamps = done_of(seq).timestamps
    assert "retrieval_start" in stamps and "prefill_start" not in stamps


# The span tree.


def check_request_trace(spans: list[S], path: str, tail: list[str], stages: list[str]) -> S:
    """The request's SERVER span continues TRACEPARENT; under it preprocess, engine (with `stages` in this
    order, one after the other), then the `tail` spans, in time order. Returns the request span."""
    (req,) = [s for s in spans if s.server and s.name == f"POST {path}"]
    assert (req.trace_id, req.parent) == (TRACE_ID, PARENT_ID)
    assert all(s.trace_id == TRACE_ID for s in spans)
    kids = children(spans, req)
    assert [k.name for k in kids] == ["preprocess", "engine", *tail]
    preprocess, engine = kids[:2]
    assert all(within(k, req) for k in kids)
    assert preprocess.end <= engine.start + TOLERANCE_NS  # the image was ready before the engine had it
    assert all(engine.end <= k.end + TOLERANCE_NS for k in kids[2:])  # text out once the engine is done
    inner = children(spans, engine)
    assert [s.name for s in inner] == stages
    for a, b in zip(inner, inner[1:], strict=False):
        assert a.end <= b.start + 1000, (a, b)  # one after the other (1 us: float seconds to ns)
    assert all(within(s, engine) for s in inner)
    assert not children(spans, inner[0])
    return req


@contextmanager
def ready_client(settings: Settings, tracing: Tracing | None = None) -> Iterator[TestClient]:
    """A TestClient of the app once its model is loaded (it loads in the background: /ready is 503 until
    then, and so are the model routes)."""
    with TestClient(create_app(settings, tracing=tracing)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not get ready in 120 s")
            time.sleep(0.05)
        yield client


@contextmanager
def in_memory_client(root: str) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    """A server of `root` (engine thread) tracing into an in-memory exporter, once ready."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(model=root, device="cpu", dtype="float32", engine="thread", max_wait_ms=0)
    with ready_client(settings, Tracing(provider)) as client:
        yield client, exporter


@pytest.fixture(scope="module")
def in_memory(checkpoints):
    """A BLIP-2 OPT server (engine thread) tracing into an in-memory exporter."""
    root = str(checkpoints("pre_ln")[0])
    with in_memory_client(root) as (client, exporter):
        yield client, exporter, root


def test_a_caption_trace_has_its_stages_in_order(in_memory, caplog):
    client, exporter, model = in_memory
    exporter.clear()
    body = {"image": b64(png_bytes(1)), "max_new_tokens": 4, "min_new_tokens": 3}
    with caplog.at_level(logging.INFO, logger="blipserve"):
        r = client.post("/caption", json=body, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    req = check_request_trace(spans, "/caption", ["detokenize"], ["queue", "vision", "prefill", "decode"])
    usage = r.json()["usage"]
    assert req.attributes["gen_ai.request.model"] == model
    assert req.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert req.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert req.attributes["blipserve.image.width"] == (80,) and req.attributes["blipserve.image.height"] == (
        60,
    )
    assert req.attributes["http.response.status_code"] == 200
    assert req.attributes["blipserve.request_id"] == r.headers["x-request-id"]
    (line,) = [rec for rec in caplog.records if getattr(rec, "path", "") == "/caption"]
    assert line.trace_id == f"{TRACE_ID:032x}" and f"trace={TRACE_ID:032x}" in line.getMessage()
    assert json.loads(JsonFormatter().format(line))["trace_id"] == f"{TRACE_ID:032x}"


def test_a_streamed_caption_and_a_new_trace(in_memory):
    client, exporter, _ = in_memory
    exporter.clear()
    body = {"image": b64(png_bytes(2)), "max_new_tokens": 3, "min_new_tokens": 3, "stream": True}
    r = client.post("/caption", json=body, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200 and '"done": true' in r.text.replace('"done":true', '"done": true')
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    check_request_trace(spans, "/caption", ["stream", "detokenize"], ["queue", "vision", "prefill", "decode"])
    exporter.clear()
    r = client.post("/caption", json={"image": b64(png_bytes(2)), "max_new_tokens": 2})  # no traceparent
    (req,) = [from_sdk(s) for s in exporter.get_finished_spans() if s.name == "POST /caption"]
    assert req.parent is None and req.trace_id != TRACE_ID
    exporter.clear()
    unsampled = TRACEPARENT[:-2] + "00"  # the caller's sampler dropped this trace: so do we
    r = client.post(
        "/caption", json={"image": b64(png_bytes(2)), "max_new_tokens": 2}, headers={"traceparent": unsampled}
    )
    assert r.status_code == 200 and exporter.get_finished_spans() == ()
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert exporter.get_finished_spans() == ()  # probes and scrapes are not traced


def test_a_candidates_trace(in_memory):
    """Candidates: the engine's stage is "scoring" (the prompt's prefill and the candidates' forward), and
    the request span counts the prompt's tokens (nothing is generated)."""
    client, exporter, _ = in_memory
    exporter.clear()
    body = {"image": b64(png_bytes(6)), "question": "what?", "candidates": ["a cat", "a dog"]}
    r = client.post("/vqa", json=body, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    req = check_request_trace(spans, "/vqa", [], ["queue", "vision", "scoring"])
    assert req.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"] > 0
    assert req.attributes["gen_ai.usage.output_tokens"] == 0


def test_a_retrieval_trace(checkpoints):
    with in_memory_client(str(checkpoints("blip2_itm")[0])) as (client, exporter):
        body = {"image": b64(png_bytes(4)), "texts": ["a cat"]}
        r = client.post("/match", json=body, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    spans = [from_sdk(s) for s in exporter.get_finished_spans()]
    check_request_trace(spans, "/match", [], ["queue", "vision", "retrieval"])


def test_tracing_is_off_by_default(checkpoints, caplog):
    assert Settings().otlp_traces_endpoint is None and Tracing.from_settings(Settings()) is None
    root, _ = checkpoints("pre_ln")
    settings = Settings(model=str(root), device="cpu", dtype="float32", engine="thread", max_wait_ms=0)
    with ready_client(settings) as client, caplog.at_level(logging.INFO, logger="blipserve"):
        assert client.app.state.service.tracing is None
        assert (
            client.post("/caption", json={"image": b64(png_bytes(1)), "max_new_tokens": 2}).status_code == 200
        )
    (line,) = [rec for rec in caplog.records if getattr(rec, "path", "") == "/caption"]
    assert not hasattr(line, "trace_id") and "trace=" not in line.getMessage()


def test_without_the_sdk_the_flag_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails as if not installed
    settings = Settings(otlp_traces_endpoint="http://127.0.0.1:4318")
    with pytest.raises(StartupError, match="pip install 'blipserve\\[otel\\]'"):
        check(settings)
    with pytest.raises(RuntimeError, match="OpenTelemetry SDK"):
        Tracing.from_settings(settings)
    from server.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--otlp-traces-endpoint", "http://127.0.0.1:4318"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"blipserve: error: {MISSING_SDK}" and "Traceback" not in err


def test_the_endpoint_must_be_an_http_url():
    with pytest.raises(StartupError, match="--otlp-traces-endpoint collector:4318: expected an http"):
        check(Settings(otlp_traces_endpoint="collector:4318"))


def test_traces_url():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://x.example/otlp/v1/traces") == "https://x.example/otlp/v1/traces"


# Across processes, through a real OTLP/HTTP receiver.


def check_exported(spans: list[S], response: httpx.Response) -> None:
    spans = [s for s in spans if s.trace_id == TRACE_ID]
    req = check_request_trace(spans, "/caption", ["detokenize"], ["queue", "vision", "prefill", "decode"])
    assert req.attributes["gen_ai.usage.output_tokens"] == response.json()["usage"]["completion_tokens"]
    assert req.attributes["blipserve.image.width"] == (80,)


def test_traces_reach_an_otlp_receiver_across_the_engine_process(checkpoints, monkeypatch, caplog):
    """HTTP in this process (uvicorn on a thread), the engine in its own, spans to a real receiver."""
    root, _ = checkpoints("pre_ln")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "blipserve-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not 5 s
    with receiver() as (endpoint, server):
        settings = Settings(model=str(root), device="cpu", engine="process", otlp_traces_endpoint=endpoint)
        with serve_in_thread(settings) as url, caplog.at_level(logging.INFO, logger="blipserve"):
            body = {"image": b64(png_bytes(5)), "max_new_tokens": 4, "min_new_tokens": 3}
            r = httpx.post(url + "/caption", json=body, headers={"traceparent": TRACEPARENT}, timeout=60)
            assert r.status_code == 200, r.text
            spans = wait_for(server, "POST /caption")
    check_exported(spans, r)
    assert {r["service.name"] for r in server.resources} == {"blipserve-test"}
    (line,) = [rec for rec in caplog.records if getattr(rec, "path", "") == "/caption"]
    assert json.loads(JsonFormatter().format(line))["trace_id"] == f"{TRACE_ID:032x}"


def test_an_abandoned_stream_is_traced_as_cancelled(checkpoints, monkeypatch):
    """A client that leaves a stream: its request span is exported, its stream span says "cancelled", and
    the server keeps serving."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with receiver() as (endpoint, server):
        svc, gated = gated_service(checkpoints("pre_ln"), otlp_traces_endpoint=endpoint)
        gated.delay = 0.05  # 120 tokens would take 6 s: the client leaves long before
        with serve_in_thread(svc.settings, svc) as url:
            body = {"image": b64(png_bytes(7)), "max_new_tokens": 120, "min_new_tokens": 120, "stream": True}
            headers = {"traceparent": TRACEPARENT}
            with httpx.stream("POST", url + "/caption", json=body, headers=headers, timeout=60) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first event, then away
            spans = [s for s in wait_for(server, "POST /caption") if s.trace_id == TRACE_ID]
            gated.delay = 0
            ok = httpx.post(url + "/caption", json={"image": body["image"], "max_new_tokens": 3}, timeout=60)
            assert ok.status_code == 200
    (req,) = [s for s in spans if s.server]
    (stream,) = children(spans, req)[1:]
    assert stream.name == "stream" and stream.attributes["blipserve.finish_reason"] == "cancelled"


@pytest.mark.slow
def test_the_cli_flag_traces_across_the_engine_process(checkpoints, monkeypatch):
    """The same through `python -m server.cli --otlp-traces-endpoint URL --log-format json`."""
    root, _ = checkpoints("pre_ln")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "blipserve-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not 5 s
    with receiver() as (endpoint, server):
        flags = ["--model", str(root), "--device", "cpu", "--engine", "process", "--log-format", "json"]
        with serve_in_process(*flags, "--otlp-traces-endpoint", endpoint) as (url, proc):
            body = {"image": b64(png_bytes(5)), "max_new_tokens": 4, "min_new_tokens": 3}
            r = httpx.post(url + "/caption", json=body, headers={"traceparent": TRACEPARENT}, timeout=60)
            assert r.status_code == 200, r.text
            spans = wait_for(server, "POST /caption")
        log = proc.stdout.read()
    check_exported(spans, r)
    assert {r["service.name"] for r in server.resources} == {"blipserve-test"}
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    (access,) = [x for x in lines if x.get("path") == "/caption"]
    assert access["trace_id"] == f"{TRACE_ID:032x}"
