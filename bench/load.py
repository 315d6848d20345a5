"""Served load: raw HTTP/1.1 keep-alive clients in several processes -> requests/s, p50/p99 latency,
the server's CPU per request (engine processes and HTTP processes apart), the load generator's own CPU.

    python bench/load.py                                   # starts the servers itself (tiny checkpoint)
    python bench/load.py --engines thread,process          # baseline (engine in the HTTP process) beside
    python bench/load.py --hf                              # + transformers' offline batched generate
    python bench/load.py --dp 1,2                          # one engine process beside two (--dp)
    python bench/load.py --url http://127.0.0.1:8000       # an already running server (loopback only)
    python bench/load.py --ref 58bc13d --stop "never-said"  # every request with a stop string, beside a commit
    python bench/load.py --ref 58bc13d --rounds 3 --requests 1024   # this tree beside commit 58bc13d
    python bench/load.py --ref HEAD --requests 64 --concurrency 16,64 --warmup 16   # smoke check: ~1x

--ref COMMIT: the same load against this tree's server and the commit's (`python -m server.cli` of a
temporary checkout, bench/baseline.py), both started, measured one at a time level by level, the order
flipping each level and each of --rounds rounds; then per level the medians side by side with this / ref: req/s, p50/p99, engine CPU ms per request
(the engine processes' user + system time over the level / requests served, from /proc) and the HTTP
processes' (the rest of the server's process tree), and req/s at the top level over that at 16 clients.

The clients send pre-encoded requests over plain asyncio streams (no HTTP library on the hot path), so
the generator costs far less CPU than the server it measures; `client cpu` says how much it took. Every
loop is bounded: `--requests` per level and `--max-seconds` per level. Traffic goes only to loopback.
Distinct images per request, and each pass (warm-up, each level of each round) its own, so the
image-embedding cache does not flatter the result.

--model-cpu splits each engine's CPU into the model's math (vision stage, prefill, decode step, timed in
the server processes of both trees by bench/model_cpu/sitecustomize.py) and its host work (the rest); it
measures a CPU engine running eagerly with one torch thread (see that file).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL_CPU = ROOT / "bench" / "model_cpu"  # its sitecustomize.py times the model inside the servers
sys.path.insert(0, str(ROOT))

from bench.baseline import engine_pids, free_port, reference_tree, tree_cpu, tree_env  # noqa: E402
from bench.load_report import compare, hf_offline, medians, side_by_side  # noqa: E402


def images(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """`n` distinct random JPEGs (`seed` picks the set: each pass of the load sends a set of its own)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def http_request(host: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST /caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _connections(host: str, port: int, raws: list[bytes], conns: int, max_s: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    todo = list(range(len(raws)))
    deadline = time.monotonic() + max_s

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while todo and time.monotonic() < deadline:
                raw = raws[todo.pop()]
                start = time.perf_counter()
                status = await _exchange(reader, writer, raw)
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            writer.close()

    start = time.perf_counter()
    results = await asyncio.gather(*(connection() for _ in range(conns)), return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    return {"latencies": latencies, "errors": errors, "start": start, "end": time.perf_counter()}


def _client_process(args: tuple) -> dict:
    host, port, raws, conns, max_s = args
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_connections(host, port, raws, conns, max_s))
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu"] = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return out


def level(url: str, concurrency: int, raws: list[bytes], clients: int, max_s: float, pool) -> dict:
    """`concurrency` connections spread over `clients` processes, each request sent once."""
    u = urlparse(url)
    n = min(clients, concurrency)
    jobs = [
        (u.hostname, u.port, raws[i::n], concurrency // n + (i < concurrency % n), max_s) for i in range(n)
    ]
    parts = pool.map(_client_process, jobs)
    latencies = sorted(x for p in parts for x in p["latencies"])
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    ok = len(latencies)
    return {"ok": ok, "rps": ok / wall, "p50": q[49], "p99": q[98], "errors": errors,
            "client_cpu": sum(p["cpu"] for p in parts), "wall": wall}  # fmt: skip


def histograms(url: str) -> dict[str, list[tuple[float, float]]]:
    """Cumulative (le, count) buckets of the engine's step histograms, from /metrics (summed over the
    engines of --dp)."""
    sums: dict[str, dict[float, float]] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name in ("blipserve_inter_token_seconds", "blipserve_decode_step_seconds"):
            if line.startswith(name + "_bucket"):
                le = float(line.split('le="')[1].split('"')[0])
                buckets = sums.setdefault(name, {})
                buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return {name: sorted(buckets.items()) for name, buckets in sums.items()}


def quantile(before: list, after: list, q: float) -> float:
    """The q-quantile (bucket upper bound) of the observations between two scrapes."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    return next((le for le, c in counts if c >= q * total), float("inf")) if total else float("nan")


def start_server(
    model: str, port: int, engine: str, extra: list[str], tree: Path = ROOT, model_cpu: Path | None = None
) -> subprocess.Popen:
    """`python -m server.cli` of `tree` (this one or a reference checkout) on loopback, once /ready is 200
    and every engine of --dp serves. Only flags both trees know: --engine only when not the default.
    `model_cpu`: a folder where its processes write their model CPU time (bench/model_cpu)."""
    env = tree_env(tree)
    if model_cpu is not None:  # bench/model_cpu/sitecustomize.py first on the path, before the tree
        env |= {"PYTHONPATH": f"{MODEL_CPU}:{env['PYTHONPATH']}", "BLIPSERVE_MODEL_CPU_DIR": str(model_cpu)}
    cmd = [sys.executable, "-m", "server.cli", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *(["--engine", engine] if engine != "process" else []), *extra]  # fmt: skip
    with tempfile.TemporaryFile() as log:  # the server's output, shown if it exits before it serves
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(900):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"server in {tree} exited {proc.returncode}:\n{log.read()[-3000:].decode()}"
                )
            if _ready(port):
                return proc
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _ready(port: int) -> bool:
    """/ready is 200 and (--dp) every engine that /v1/models lists is ready."""
    try:
        if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code != 200:
            return False
        info = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()["data"][0]
    except httpx.HTTPError:
        return False
    return all(e["state"] == "ready" for e in info.get("engines", []))


@dataclass
class Server:
    """A server under load: its label, URL, main process (None: given by --url) and engine pids."""

    label: str
    url: str
    proc: subprocess.Popen | None
    engines: list[int]
    model_cpu: Path | None = None  # where its engines write their model CPU seconds (--model-cpu)

    def engine_model_cpu(self) -> float:
        """CPU seconds so far of its engines inside the model (NaN without --model-cpu)."""
        if self.model_cpu is None or not self.engines:
            return float("nan")
        files = [self.model_cpu / str(pid) for pid in self.engines]
        return sum(float(f.read_text()) for f in files if f.exists())

    def raws(self, bodies: list[dict]) -> list[bytes]:
        """`bodies` as HTTP requests pre-encoded for this server's address."""
        return [http_request(urlparse(self.url).netloc, b) for b in bodies]

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the whole server (main process and all below it) and of its engines."""
        return (tree_cpu([self.proc.pid]) if self.proc else float("nan")), tree_cpu(self.engines)


HEADER = (f"{'server':>18} {'conc':>5} {'ok':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'engine cpu':>11} "
          f"{'http cpu':>9} {'client cpu':>11} {'step p50':>9} {'gap p99':>8}  errors   (cpu: ms/req)")  # fmt: skip


def measure(server: Server, c: int, raws: list[bytes], args, pool) -> dict:
    """One concurrency level against `server`: `level`'s figures plus the engine processes' and the HTTP
    processes' CPU ms per request (NaN where unknown) and the step histograms' p50 / p99; printed."""
    (total, eng), model, hist = server.cpu(), server.engine_model_cpu(), histograms(server.url)
    r = level(server.url, c, raws, args.clients, args.max_seconds, pool)
    if server.model_cpu is not None:
        time.sleep(0.2)  # the engines write their model CPU every 50 ms
    (total2, eng2), model2, after = server.cpu(), server.engine_model_cpu(), histograms(server.url)
    ok = max(r["ok"], 1)
    r["engine_cpu"] = 1e3 * (eng2 - eng) / ok if server.engines else float("nan")
    r["model_cpu"] = 1e3 * (model2 - model) / ok
    r["host_cpu"] = r["engine_cpu"] - r["model_cpu"]
    r["http_cpu"] = 1e3 * ((total2 - total) - (eng2 - eng)) / ok
    step, gap = "blipserve_decode_step_seconds", "blipserve_inter_token_seconds"
    r["step"] = quantile(hist[step], after[step], 0.5) if step in after else float("nan")
    r["gap"] = quantile(hist[gap], after[gap], 0.99) if gap in after else float("nan")
    print(f"{server.label:>18} {c:>5} {r['ok']:>5} {r['rps']:>8.1f} {r['p50'] * 1e3:>8.1f} {r['p99'] * 1e3:>8.1f} "
          f"{r['engine_cpu']:>11.2f} {r['http_cpu']:>9.2f} {1e3 * r['client_cpu'] / ok:>11.2f} "
          f"{r['step'] * 1e3:>9.1f} {r['gap'] * 1e3:>8.1f}  {r['errors'] or '-'}"
          + ("" if math.isnan(r["model_cpu"]) else f"  (engine: model {r['model_cpu']:.2f}, host {r['host_cpu']:.2f})"),
          flush=True)  # fmt: skip
    return r


@contextlib.contextmanager
def running(target: tuple, model: str | None, args, index: int) -> Iterator[Server]:
    """The server of `target` (label, engine, url, dp, tree) started on port --port + `index` (or a free
    one), or the given url; stopped on exit."""
    label, engine, given, dp, tree = target
    port = args.port + index if args.port else free_port()
    url = given or f"http://127.0.0.1:{port}"
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load is only sent to loopback addresses")
    extra = [*args.server_args.split(), *(["--dp", str(dp)] if dp > 1 else [])]
    model_cpu = (
        Path(tempfile.mkdtemp(prefix="blipserve-model-cpu-")) if args.model_cpu and not given else None
    )
    proc = None
    try:
        proc = None if given else start_server(model, port, engine, extra, tree, model_cpu)
        info = httpx.get(url + "/v1/models").json()["data"][0]
        engines = engine_pids(proc.pid, info, engine, dp) if proc else []
        print(f"{label}: engine {engine}, --dp {dp or '?'}, engine pids {engines or '-'}; model {info['id']} "
              f"on {info['device']} ({info['dtype']}); code from {tree}")  # fmt: skip
        yield Server(label, url, proc, engines, model_cpu)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if model_cpu is not None:
            shutil.rmtree(model_cpu, ignore_errors=True)


def check_model_cpu(servers: list[Server]) -> None:
    """--model-cpu: after the warm-up, every started engine has written its model CPU (else the probe
    did not load there: a model other than BLIP-2, or an interpreter that skips sitecustomize); and the
    last writes of the warm-up are in before the first level reads them."""
    time.sleep(0.2)
    for s in servers:
        if s.model_cpu is not None and any(not (s.model_cpu / str(pid)).exists() for pid in s.engines):
            raise SystemExit(f"--model-cpu: {s.label}'s engines wrote no model CPU (bench/model_cpu)")


def run_group(group: list[tuple], model: str | None, bodies: Callable[[int], list[dict]], args, pool,
              runs: dict) -> None:  # fmt: skip
    """Start the servers of `group` (this tree's and, with --ref, the reference's) together, warm each
    up, then measure one at a time, level by level, the order flipping each level and round (ABBA: a
    drift of the shared machine's load hits both alike); each figure goes to runs[label][round][level].
    Every pass (the warm-up, each level of each round) sends images of its own (`bodies(pass)`): a server
    that has seen an image keeps its embeddings, and a repeat would skip the vision stage."""
    levels = [int(x) for x in args.concurrency.split(",")]
    with contextlib.ExitStack() as up:
        servers = [up.enter_context(running(t, model, args, i)) for i, t in enumerate(group)]
        for s in servers if args.warmup else []:
            raws = s.raws(bodies(0)[: args.warmup])
            level(s.url, min(16, args.warmup), raws, args.clients, args.max_seconds, pool)
        if args.model_cpu:
            check_model_cpu(servers)
        print(HEADER)
        for r in range(args.rounds):
            for i, c in enumerate(levels):
                passed = bodies(1 + r * len(levels) + i)
                for s in servers[:: -1 if (r + i) % 2 else 1]:
                    runs.setdefault(s.label, [{} for _ in range(args.rounds)])[r][c] = measure(
                        s, c, s.raws(passed), args, pool
                    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default=None, help="default: a tiny checkpoint written for the run")
    ap.add_argument("--port", type=int, default=0, help="for the started servers (0: a free one)")
    ap.add_argument("--engines", default="process", help="comma list of thread,process (servers started)")
    ap.add_argument("--server-args", default="", help="extra flags for the started servers")
    ap.add_argument("--dp", default="1", help="comma list of --data-parallel-size values (servers started)")
    ap.add_argument("--concurrency", default=None, help="default 1,16,64,256; with --ref 16,64,256")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=32, help="requests sent to each server before measuring")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument(
        "--stop",
        default=None,
        help="a stop string sent with every request (one that never matches: the text is watched every step)",
    )
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--ref", default=None, help="a commit: its server beside this tree's, same run")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every server, alternating with --ref")
    ap.add_argument(
        "--model-cpu",
        action="store_true",
        help="split the engine's CPU into the model's (vision, prefill, decode step) and the rest",
    )
    ap.add_argument("--hf", action="store_true", help="also transformers' offline batched generate")
    ap.add_argument("--hf-batch", type=int, default=64)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    args.concurrency = args.concurrency or ("16,64,256" if args.ref else "1,16,64,256")
    if args.ref and args.url:
        raise SystemExit("--ref starts both servers itself; leave out --url")
    tmp = tempfile.TemporaryDirectory(prefix="blipserve-load-")
    model = args.model
    if model is None and not args.url:
        sys.path.insert(0, str(ROOT / "tests"))
        from oracle import make_checkpoint

        make_checkpoint(Path(tmp.name), "pre_ln", image_size=224)
        model = tmp.name
    n = args.max_new_tokens
    extra = {"stop": [args.stop]} if args.stop else {}  # the text is then read every step

    @functools.lru_cache(maxsize=2)  # a pass's bodies for each server of a group; ~60 MB at 1,024
    def bodies(pass_no: int) -> list[dict]:
        # min_new_tokens = max_new_tokens: every request does the same work (no early stop).
        pics = images(args.requests, seed=pass_no)
        return [{"image": base64.b64encode(p).decode(), "max_new_tokens": n, "min_new_tokens": n, **extra}
                for p in pics]  # fmt: skip

    dps = [int(d) for d in args.dp.split(",")]
    print(f"device: {os.uname().nodename}, {os.cpu_count()} CPUs; {n} new tokens; {args.clients} client "
          f"processes; {args.requests} requests per level")  # fmt: skip
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(reference_tree(args.ref)) if args.ref else None
        configs = (
            [("given", args.url, 0)]
            if args.url
            else [(e, None, d) for e in args.engines.split(",") for d in (dps if e == "process" else [1])]
        )
        groups = [[(f"{e} dp{d}", e, u, d, ROOT), *([(f"{e} dp{d} @ref", e, None, d, ref)] if ref else [])]
                  for e, u, d in configs]  # fmt: skip
        runs: dict[str, list[dict[int, dict]]] = {}
        with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
            for group in groups:
                run_group(group, model, bodies, args, pool, runs)
    table = [(name, c, row) for name, rs in runs.items() for c, row in medians(rs).items()]
    if len(runs) > 1:
        side_by_side(table)
    for group in groups if ref else []:
        compare(runs[group[0][0]], runs[group[1][0]], group[0][0], args.ref)
    if args.hf:
        rate = hf_offline(Path(model), images(args.requests), n, args.hf_batch)
        print(f"\ntransformers generate, offline, batch {args.hf_batch}: {rate:.1f} images/s")
    tmp.cleanup()


if __name__ == "__main__":
    main()
