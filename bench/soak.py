"""Soak: thousands of requests on loopback against a `blipserve` subprocess, with overload on purpose.

    python bench/soak.py --requests 5000 --concurrency 64

Prints requests sent, responses by status, requests lost (sent without any HTTP answer: must be 0),
and the server's RSS before, after and at peak. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


BACKOFF_S = 0.05


@dataclass
class Summary:
    sent: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # no HTTP answer, even after one retry
    retried: int = 0  # connection failed before any answer (e.g. a keep-alive race), sent again once
    seconds: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process and its children (the engine process), from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    rss, peak = int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        child_rss, child_peak = rss_mb(int(child))
        rss, peak = rss + child_rss, peak + child_peak
    return rss, peak


def bodies(n_images: int) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n_images):
        buf = io.BytesIO()
        size = (32 + i % 50, 24 + i % 70)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        if i % 3 == 0:
            out.append(("/vqa", {"image": image, "question": f"what is {i}?", "max_new_tokens": 4 + i % 5}))
        elif i % 7 == 0:
            out.append(("/caption", {"image": "broken" + image[:40]}))  # 400 on purpose
        else:
            out.append(("/caption", {"image": image, "max_new_tokens": 2 + i % 9, "num_beams": 1 + i % 2}))
    return out


async def soak(url: str, requests: int, concurrency: int, max_seconds: float, pid: int) -> Summary:
    summary = Summary()
    summary.rss_before_mb = rss_mb(pid)[0]
    work = bodies(64)
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            path, body = work[i % len(work)]
            summary.sent += 1
            key = None
            for attempt in range(2):
                try:
                    r = await client.post(path, json=body)
                    key = str(r.status_code)
                    break
                except httpx.TransportError as exc:
                    key = type(exc).__name__
                    summary.retried += attempt == 0
            if not key.isdigit():
                summary.lost += 1
            summary.by_status[key] = summary.by_status.get(key, 0) + 1
            if key == "429":
                # Back off briefly, as a client that honours overload does: a 429 comes back in about a
                # millisecond, so clients that resend at once would make nearly every response a 429.
                await asyncio.sleep(BACKOFF_S)

    start = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)
    ) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    summary.seconds = round(time.perf_counter() - start, 1)
    summary.rss_after_mb, summary.rss_peak_mb = rss_mb(pid)
    return summary


def main() -> None:
    from live import serve_in_process

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--max-queue", type=int, default=16)
    args = ap.parse_args()
    flags = ["--max-queue", str(args.max_queue), "--max-running-seqs", "16", "--log-level", "warning"]
    with serve_in_process(*flags) as (url, proc):
        result = asyncio.run(soak(url, args.requests, args.concurrency, args.max_seconds, proc.pid))
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
