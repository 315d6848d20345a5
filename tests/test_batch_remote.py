"""`blipserve batch --url` against a live server equals the in-process job; request priorities."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from batch_data import (
    check_unbatchable,
    image_folder,
    openai_file,
    parquet_paths,
    read_rows,
    unbatchable_file,
    webdataset,
)
from live import b64, png_bytes, serve_in_process, serve_in_thread
from test_batching import FakeRequest, FakeRunner, drive

from batching import Scheduler
from batching.protocol import add_message, decode_to_engine
from model.decoding.generation import SamplingParams
from server.batch.cli import run_batch
from server.service import Service
from server.settings import Settings


def model_flags(root: Path) -> list[str]:
    return ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-running-seqs", "8"]


@dataclass
class Prioritised(FakeRequest):
    priority: int = 0


def test_scheduler_admits_by_priority_fifo_within_one() -> None:
    sched = Scheduler(num_slots=1, max_queue=16, max_batch_images=4, eos_ids=(99,), background_vision=False)
    order = [("low0", -10), ("low1", -10), ("mid", 0), ("high", 5), ("low2", -10), ("mid2", 0)]
    seqs = {name: sched.add(Prioritised(1, name, text_ids=[51], priority=p)) for name, p in order}
    assert [s.request.image_key for s in sched.waiting] == ["high", "mid", "mid2", "low0", "low1", "low2"]
    finished = drive(sched, FakeRunner())
    assert [s.request.image_key for s in finished] == ["high", "mid", "mid2", "low0", "low1", "low2"]
    assert all(s.finish_reason == "stop" for s in seqs.values())


def test_high_priority_request_overtakes_a_queue_of_low_ones(root) -> None:
    """One KV slot: low-priority requests queue behind the running one; a default-priority request sent
    after all of them is the next one admitted."""
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_running_seqs=1, engine="thread")
    svc = Service.build(settings)
    launch = svc.lifecycle.runner.launch

    def slow_launch(plan):  # each step 20 ms longer: the running request outlasts the sending of the rest
        time.sleep(0.02)
        return launch(plan)

    svc.lifecycle.runner.launch = slow_launch
    with serve_in_thread(settings, svc) as url:

        async def go() -> list[str]:
            finished: list[str] = []

            async def one(client: httpx.AsyncClient, name: str, priority: int) -> None:
                body = {
                    "image": b64(png_bytes(3)),
                    "max_new_tokens": 16,
                    "min_new_tokens": 16,
                    "priority": priority,
                }
                r = await client.post("/caption", json=body)
                assert r.status_code == 200, r.text
                finished.append(name)

            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                lows = [asyncio.ensure_future(one(client, f"low{i}", -10)) for i in range(4)]
                for _ in range(1000):  # one running (16 tokens: long enough), three waiting
                    if len(svc.lifecycle.scheduler.waiting) == 3 or finished:
                        break
                    await asyncio.sleep(0.01)
                assert len(svc.lifecycle.scheduler.waiting) == 3 and not finished
                high = asyncio.ensure_future(one(client, "high", 0))
                await asyncio.gather(*lows, high)
            return finished

        finished = asyncio.run(go())
    assert finished.index("high") == 1, finished  # right after the one that was running
    assert sorted(finished) == ["high", "low0", "low1", "low2", "low3"]


def test_priority_crosses_to_the_engine_process(tmp_path) -> None:
    from batching.engine_process import request_from_message
    from model.checkpoint.tiny import write_tiny_checkpoint
    from model.frontend import Frontend
    from model.request_checks import RequestGuard

    frontend = Frontend.from_dir(write_tiny_checkpoint(tmp_path), "tiny")
    side = frontend.image_processor
    request = frontend.request(
        torch.zeros(3, side.height, side.width), "k", None, SamplingParams(max_new_tokens=3)
    )
    request.priority = -10
    frames = add_message(7, request, None, False)
    msg = decode_to_engine(frames[0])
    assert msg.priority == -10
    guard = RequestGuard(frontend.processor, side.height, side.width, 100, 2)
    assert request_from_message(guard)(msg, request.pixel_values).priority == -10


def test_priority_in_the_api(root) -> None:
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_running_seqs=4, engine="thread")
    with serve_in_thread(settings) as url:
        image = png_bytes(1)
        r = httpx.post(
            url + "/caption", files={"image": image}, data={"priority": "-10", "max_new_tokens": "3"}
        )
        assert r.status_code == 200, r.text
        r = httpx.post(url + "/vqa", json={"image": b64(image), "question": "what?", "priority": 2000})
        assert r.status_code == 422 and "priority" in r.json()["error"]["message"]
        chat = {
            "model": str(root),
            "priority": -5,
            "max_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image)}}
                    ],
                }
            ],
        }
        assert httpx.post(url + "/v1/chat/completions", json=chat).status_code == 200


def test_url_mode_equals_the_local_job(tmp_path, root) -> None:
    webdataset(tmp_path / "shards")
    (tmp_path / "pq").mkdir()
    parquet_paths(tmp_path / "pq" / "p.parquet")
    openai_file(tmp_path / "requests.jsonl", str(root))
    jobs = {
        "wds": [
            str(tmp_path / "shards"),
            "--task",
            "vqa",
            "--question-column",
            "question",
            "--max-new-tokens",
            "6",
        ],
        "pq": [str(tmp_path / "pq"), "--image-column", "file", "--key-column", "id", "--format", "jsonl"],
        "oa": [str(tmp_path / "requests.jsonl")],
    }
    for name, args in jobs.items():
        assert run_batch([*args, "-o", str(tmp_path / f"local-{name}"), *model_flags(root), "--quiet"]) == 1
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_running_seqs=8, engine="thread")
    with serve_in_thread(settings) as url:
        for name, args in jobs.items():
            out = str(tmp_path / f"url-{name}")
            assert run_batch([*args, "-o", out, "--url", url, "--concurrency", "4", "--quiet"]) == 1
    for name in ("wds", "pq"):
        local = sorted((tmp_path / f"local-{name}").glob("*.*[qtl]"))
        remote = sorted((tmp_path / f"url-{name}").glob("*.*[qtl]"))
        assert [p.name for p in local] == [p.name for p in remote] and local
        for a, b in zip(local, remote, strict=True):
            assert read_rows(a) == read_rows(b), a.name
    local = read_rows(tmp_path / "local-oa" / "requests.jsonl")
    remote = read_rows(tmp_path / "url-oa" / "requests.jsonl")
    assert [essence(x) for x in local] == [essence(x) for x in remote]
    assert json.loads((tmp_path / "url-oa" / "requests.stats.json").read_text())["errors"] == 2


def test_url_mode_refuses_streaming_lines(tmp_path, root) -> None:
    """With --url, a batch line asking for a stream is its error (not a 200 row holding an error)."""
    unbatchable_file(tmp_path / "oai.jsonl", str(root))
    out = tmp_path / "oai_out.jsonl"
    settings = Settings(model=str(root), device="cpu", dtype="float32", max_running_seqs=8, engine="thread")
    with serve_in_thread(settings) as url:
        assert run_batch([str(tmp_path / "oai.jsonl"), "-o", str(out), "--url", url, "--quiet"]) == 1
    check_unbatchable(out)


def essence(line: dict) -> tuple:
    """An OpenAI batch output line without its ids, timings and timestamps."""
    response = line["response"] or {}
    body = response.get("body") or {}
    texts = (
        body.get("caption")
        or body.get("answer")
        or [c["message"]["content"] for c in body.get("choices", [])]
    )
    return line["custom_id"], response.get("status_code"), str(texts or body.get("error")), line["error"]


def kill_after_a_shard(proc, out: Path, timeout: float = 180) -> threading.Thread:
    """Kill the server once the job has written its first shard (others are left)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not list(out.glob("*.stats.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # two server processes (10-20 s each to start on a busy 2-core machine)
def test_server_gone_mid_job_stops_with_3_and_a_rerun_completes(tmp_path, root, capsys) -> None:
    """A server that goes away is not the rows' fault: the job stops (exit 3) without recording them as
    errors, and the same command against a server again finishes it as an uninterrupted run would."""
    image_folder(tmp_path / "imgs", 24)
    job = [str(tmp_path / "imgs"), "--max-new-tokens", "30", "--shard-size", "8", "--quiet"]
    assert run_batch([*job, "-o", str(tmp_path / "local"), *model_flags(root)]) == 0
    server = ["--model", str(root), "--device", "cpu", "--dtype", "float32", "--max-running-seqs", "2"]
    out = tmp_path / "url"
    remote = [*job, "-o", str(out), "--concurrency", "2", "--retries", "0"]
    with serve_in_process(*server) as (url, proc):
        watcher = kill_after_a_shard(proc, out)
        assert run_batch([*remote, "--url", url]) == 3
        watcher.join()
    assert "no answer after 0 retries" in capsys.readouterr().err  # one line says why it stopped
    written = [r for p in out.glob("*.progress.jsonl") for r in read_rows(p)]
    written += [r for p in out.glob("*.parquet") for r in read_rows(p)]
    assert 8 <= len(written) < 24 and all(r["error"] is None for r in written)
    with serve_in_process(*server) as (url, _):
        assert run_batch([*remote, "--url", url]) == 0
    for local in sorted((tmp_path / "local").glob("*.parquet")):
        assert read_rows(local) == read_rows(out / local.name), local.name
