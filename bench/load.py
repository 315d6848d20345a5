"""Served load: async httpx clients on loopback at rising concurrency -> requests/s, p50/p99 latency.

    python bench/load.py                                  # starts `blipserve` (tiny-random) itself
    python bench/load.py --url http://127.0.0.1:8000      # an already running server (loopback only)

Every loop is bounded: `--requests` per level and `--max-seconds` per level. Traffic goes only to the
loopback address. Distinct images per request, so the image-embedding cache does not flatter the result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def images(n: int, size: int = 224) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def level(url: str, concurrency: int, bodies: list[dict], max_seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[int | str, int] = {}
    queue = list(range(len(bodies)))
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.monotonic() < deadline:
            body = bodies[queue.pop()]
            start = time.perf_counter()
            try:
                r = await client.post("/caption", json=body)
                code: int | str = r.status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            if code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[code] = errors.get(code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"ok": len(latencies), "rps": len(latencies) / wall, "p50": q[49], "p99": q[98], "errors": errors}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=60)
    args = ap.parse_args()
    url = args.url or f"http://127.0.0.1:{args.port}"
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load is only sent to loopback addresses")
    proc = None if args.url else start_server(args.model, args.port)
    try:
        info = httpx.get(url + "/v1/models").json()["data"][0]
        print(f"model: {info['id']} on {info['device']} ({info['dtype']}); {args.max_new_tokens} new tokens")
        pics = images(args.requests)
        # min_new_tokens = max_new_tokens: every request does the same work (no early stop).
        n = args.max_new_tokens
        bodies = [{"image": p, "max_new_tokens": n, "min_new_tokens": n} for p in pics]
        # With the server started here, also its CPU time per request (everything but the client).
        print(
            f"{'conc':>5} {'ok':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu ms/req':>15}  errors"
        )
        for c in [int(x) for x in args.concurrency.split(",")]:
            before = cpu_seconds(proc.pid) if proc else 0.0
            r = asyncio.run(level(url, c, bodies, args.max_seconds))
            cpu = f"{1e3 * (cpu_seconds(proc.pid) - before) / max(r['ok'], 1):.2f}" if proc else "-"
            print(
                f"{c:>5} {r['ok']:>5} {r['rps']:>8.1f} {r['p50'] * 1e3:>8.1f} {r['p99'] * 1e3:>8.1f} {cpu:>15}"
                f"  {r['errors'] or '-'}"
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
