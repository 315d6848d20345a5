"""Per-request cost of tracing: off (the default) against the code before it, and on.

    git archive <commit before tracing> | tar -x -C /tmp/before
    python bench/tracing_overhead.py --before /tmp/before --rounds 7 --requests 100
    python bench/tracing_overhead.py --before /tmp/before --rounds 15 --requests 50 --engine-only

Three worker processes, each importing the server from its own tree: the code before tracing, this
code with tracing off, this code with tracing on (the SDK's batch span processor, spans encoded as
OTLP protobuf and dropped: the exporter's work without a network). Rounds alternate between them, so a
shared machine's load changes hit all three alike. Per request, each reports:

- `http`: a `/caption` (tiny-random, 1 new token, engine thread) through the whole app in-process
  (starlette's TestClient): median wall time per round, and the process's CPU time per request (every
  thread: HTTP, engine, span processor), the figure that load on the machine disturbs least;
- `engine`: the engine's bookkeeping alone: scheduler add + schedule + postprocess of a one-token
  request (a stand-in model) and its `Add` and `Done` messages encoded and decoded (msgpack).

The medians of the rounds are printed, with their spread (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _worker(tree: Path, mode: str, engine_only: bool) -> None:
    """Serve 'run N' lines on stdin with a JSON line of per-request figures (imports from `tree`)."""
    sys.path[:0] = [str(tree), str(tree / "tests")]
    os.chdir(tree)
    import torch

    if engine_only:
        for line in sys.stdin:
            n = int(line.split()[1])
            print(json.dumps({"engine_us": _engine_us(n * 20, mode == "on")}), flush=True)
        return
    from fastapi.testclient import TestClient
    from live import b64, png_bytes

    from server.app import create_app
    from server.settings import Settings

    torch.set_num_threads(1)
    kwargs = {"tracing": _tracing()} if mode == "on" else {}
    settings = Settings(engine="thread", device="cpu", dtype="float32", max_wait_ms=0)
    body = {"image": b64(png_bytes(1)), "max_new_tokens": 1}
    with TestClient(create_app(settings, **kwargs)) as client:
        for line in sys.stdin:
            n = int(line.split()[1])
            walls = []
            cpu = time.process_time()
            for _ in range(n):
                start = time.perf_counter()
                if client.post("/caption", json=body).status_code != 200:
                    raise RuntimeError("request failed")
                walls.append(time.perf_counter() - start)
            http_cpu = (time.process_time() - cpu) / n
            engine = _engine_us(n * 20, mode == "on")
            report = {
                "wall_ms": statistics.median(walls) * 1e3,
                "cpu_ms": http_cpu * 1e3,
                "engine_us": engine,
            }
            print(json.dumps(report), flush=True)


def _tracing():
    """Tracing as --otlp-traces-endpoint sets it up, but the exporter encodes and drops the spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from server.tracing import Tracing

    class Encode(SpanExporter):
        def export(self, spans):
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encode()))
    return Tracing(provider)


def _engine_us(n: int, trace: bool) -> float:
    """Microseconds of the engine's own per-request work: scheduling and its two messages."""
    from test_batching import EOS, FakeRunner, request

    from batching import Scheduler
    from batching.client import done_of
    from batching.protocol import add_message, decode_from_engine, decode_to_engine, encode

    sched, runner = Scheduler(8, 8, 8, (EOS,), background_vision=False), FakeRunner()
    extra = {"trace": True} if trace else {}
    start = time.perf_counter()
    for i in range(n):
        req = request(1, f"img{i}")
        decode_to_engine(add_message(i, req, None, False, **extra)[0])
        seq = sched.add(req)
        seq.trace = trace
        plan, _ = sched.schedule()
        sched.postprocess(plan, runner.run(plan))
        plan, _ = sched.schedule()
        for done in sched.postprocess(plan, runner.run(plan)):
            decode_from_engine(encode(done_of(done, i)))
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    """Parse the flags, run the rounds, print the table (see the module's docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="a tree of the code before tracing (required)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=100, help="per round and worker")
    ap.add_argument("--engine-only", action="store_true", help="only the engine's bookkeeping (quicker)")
    ap.add_argument("--worker", nargs=2, metavar=("TREE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(Path(args.worker[0]), args.worker[1], args.engine_only)
        return
    if args.before is None:
        ap.error("--before: a tree of the code before tracing is required")
    runs = {"before": (args.before, "off"), "off": (HERE, "off"), "on": (HERE, "on")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--worker", str(tree), mode, *["--engine-only"] * args.engine_only],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        for name, (tree, mode) in runs.items()
    }
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, proc in procs.items():
            proc.stdin.write(f"run {args.requests}\n")
            proc.stdin.flush()
            line = json.loads(proc.stdout.readline())
            if r:
                results[name].append(line)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print(f"{args.rounds} rounds x {args.requests} requests; medians over rounds (min-max)")
    keys = ("engine_us",) if args.engine_only else ("wall_ms", "cpu_ms", "engine_us")
    titles = {"wall_ms": "wall ms/request", "cpu_ms": "CPU ms/request", "engine_us": "engine us/request"}
    print(f"{'':8} " + " ".join(f"{titles[k]:>22}" for k in keys))
    for name, rows in results.items():
        cells = []
        for key in keys:
            values = [row[key] for row in rows]
            cells.append(f"{statistics.median(values):8.3f} ({min(values):.3f}-{max(values):.3f})")
        print(f"{name:8} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
