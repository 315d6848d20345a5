"""Data parallel (--dp N): the router over real ZMQ sockets to stand-in engines (fast), and the real server
with N engine processes: same outputs as one engine, balance, a killed engine, a restart loop (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from live import b64, png_bytes, serve_in_process
from slow_engines import ENV as SLOW_ENGINES
from test_batching import EOS
from test_engine_process import Engine, _req, _spawned_children
from test_server import metric_values

from batching import QueueFull, SequenceFailed
from batching.dp_client import DataParallelClient, rendezvous
from batching.engine_group import engine_settings, plan_devices
from batching.engine_process import EngineHandle, pid_alive
from batching.metrics import Metrics, merge_engine_metrics
from server.settings import Settings


def _engines(tmp: Path, n: int = 2, **kwargs) -> list[Engine]:
    out = []
    for i in range(n):
        (tmp / str(i)).mkdir(parents=True)
        step = kwargs.get("step_s", [0.0] * n)[i]
        out.append(Engine(tmp / str(i), kwargs.get("num_slots", 2), kwargs.get("max_queue", 4), step))
    return out


def _client(
    engines: list[Engine], routing: str = "load", pids: list[int] | None = None, min_ready: int = 2
) -> DataParallelClient:
    pids = pids or [os.getpid()] * len(engines)
    handles = [
        EngineHandle(e.address, p, "", "fake", i, "cpu")
        for i, (e, p) in enumerate(zip(engines, pids, strict=True))
    ]
    return DataParallelClient(handles, routing, min_ready=min_ready, poll_s=0.02)


def _stop(engines: list[Engine]) -> None:
    for engine in engines:
        for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.loop.cancel(seq)
        engine.stop()


async def _serve(client: DataParallelClient, count: int, tokens: int, concurrency: int) -> list[int]:
    """`count` requests, `concurrency` at a time; returns the engine that served each."""
    gate = asyncio.Semaphore(concurrency)

    async def one(k: int) -> int:
        async with gate:
            ticket = await client.add(_req(tokens, f"img{k}"))
            done = await client.wait(ticket)
            assert done.outputs[0].tokens == [*range(1, tokens + 1), EOS]
            return ticket.extra["engine"]

    return list(await asyncio.gather(*(one(k) for k in range(count))))


def test_equal_engines_share_the_load_and_a_slow_one_gets_less(tmp_path):
    even = _engines(tmp_path / "even", step_s=[0.001, 0.001], num_slots=4, max_queue=64)
    skew = _engines(tmp_path / "skew", step_s=[0.001, 0.02], num_slots=4, max_queue=64)

    async def main() -> tuple[list[int], list[int]]:
        results = []
        for engines in (even, skew):
            client = _client(engines)
            await client.connect()
            results.append(await _serve(client, 200, 3, 8))
            await client.close()
        return results[0], results[1]

    try:
        served_even, served_skew = asyncio.run(main())
    finally:
        _stop(even + skew)
    assert min(served_even.count(0), served_even.count(1)) > 200 / 3, served_even.count(0)
    # The slow engine takes 20x as long a step: the fast one serves far more.
    assert served_skew.count(0) > 3 * served_skew.count(1), served_skew.count(0)


def test_a_full_queue_spills_to_the_other_engine_and_429_only_when_all_are_full(tmp_path):
    engines = _engines(tmp_path, num_slots=1, max_queue=1, step_s=[0.002, 0.002])

    async def main() -> None:
        client = _client(engines)
        await client.connect()
        # Two engines, each one slot + one waiting: four endless requests fit, on both engines.
        tickets = [await client.add(_req(100_000, f"k{i}")) for i in range(4)]
        assert sorted(t.extra["engine"] for t in tickets) == [0, 0, 1, 1]
        with pytest.raises(QueueFull, match="every engine"):
            await client.add(_req(1))
        # Aborting reaches the engine that holds the request: its slot frees, the next request goes there.
        victim = next(t for t in tickets if t.extra["engine"] == 1)
        client.cancel(victim)
        with pytest.raises(SequenceFailed, match="cancelled"):
            await client.wait(victim)
        refill = await client.add(_req(100_000, "refill"))
        assert refill.extra["engine"] == 1
        for t in [*tickets, refill]:
            client.cancel(t)
        await asyncio.gather(*(client.wait(t) for t in [*tickets, refill]), return_exceptions=True)
        assert client.pending == 0
        await client.close()

    try:
        asyncio.run(main())
    finally:
        _stop(engines)


def test_image_affinity_keeps_a_key_on_one_engine_unless_it_is_clearly_busier(tmp_path):
    keys = [f"image-{i}" for i in range(40)]
    homes = [rendezvous(k, [0, 1]) for k in keys]
    assert 10 < homes.count(0) < 30  # the keys spread over both engines
    assert [rendezvous(k, [1]) for k in keys] == [1] * 40  # an engine down: its keys go to the others
    engines = _engines(tmp_path, num_slots=2, max_queue=64, step_s=[0.002, 0.002])

    async def main() -> None:
        client = _client(engines, "image-affinity")
        await client.connect()
        for key, home in zip(keys[:8], homes[:8], strict=True):
            for _ in range(2):  # a follow-up question about the same image goes to the same engine
                ticket = await client.add(_req(2, key))
                assert ticket.extra["engine"] == home
                await client.wait(ticket)
        # Load the home engine of keys[0] clearly past the other: the key goes elsewhere.
        home = homes[0]
        stuffed = []
        while client.load_of(home) <= 6:
            t = await client.links[home].add(_req(100_000, "stuff"))
            t.extra["engine"] = home
            stuffed.append(t)
        ticket = await client.add(_req(2, keys[0]))
        assert ticket.extra["engine"] == 1 - home
        await client.wait(ticket)
        for t in stuffed:
            client.cancel(t)
        await asyncio.gather(*(client.wait(t) for t in stuffed), return_exceptions=True)
        await client.close()

    try:
        asyncio.run(main())
    finally:
        _stop(engines)


def test_a_dead_engine_fails_only_its_requests_and_rejoins(tmp_path):
    engines = _engines(tmp_path, num_slots=2, max_queue=8, step_s=[0.002, 0.002])
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    async def main() -> None:
        # Engine 1's "process" is the stand-in: killing it is, to the client, that engine dying (its
        # Info then names this test's pid, which lives: the engine that answers Hello next rejoins).
        client = _client(engines, pids=[os.getpid(), stand_in.pid], min_ready=1)
        for link in client.links:
            await link.open()
        await asyncio.sleep(0.3)  # both answer Hello
        client.links[1].pid = stand_in.pid
        assert client.ready_engines == 2
        tickets = [await client.add(_req(100_000, f"k{i}")) for i in range(4)]
        on_one = [t for t in tickets if t.extra["engine"] == 1]
        assert len(on_one) == 2
        stand_in.kill()
        stand_in.wait()
        start = time.monotonic()
        for t in on_one:
            with pytest.raises(SequenceFailed, match="engine_died"):
                await client.wait(t)
        assert time.monotonic() - start < 1
        assert client.healthy  # one engine serves: min_ready_engines is 1
        survivors = [t for t in tickets if t.extra["engine"] == 0]
        assert all(not t.done.done() for t in survivors)
        deadline = time.monotonic() + 5
        while client.ready_engines < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert client.ready_engines == 2 and client.describe_engines()[1]["restarts"] == 1
        for t in survivors:
            client.cancel(t)
        await asyncio.gather(*(client.wait(t) for t in survivors), return_exceptions=True)
        await client.close()

    try:
        asyncio.run(main())
    finally:
        stand_in.kill()
        _stop(engines)  # engine 1 still holds the "dead" engine's two requests: cancelled here


def test_devices_and_per_engine_settings():
    assert plan_devices(Settings(data_parallel_size=2, device="cpu")) == ["cpu", "cpu"]
    assert plan_devices(Settings(data_parallel_size=2), cuda_count=4) == ["cuda:0", "cuda:1"]
    assert plan_devices(Settings(data_parallel_size=2, devices=["cuda:0", "cuda:0"])) == ["cuda:0"] * 2
    with pytest.raises(ValueError, match="one per engine"):
        plan_devices(Settings(data_parallel_size=3, devices=["cuda:0"]))
    with pytest.raises(ValueError, match="needs 4 GPUs, 2 found"):
        plan_devices(Settings(data_parallel_size=4, device="cuda"), cuda_count=2)
    child, env = engine_settings(Settings(data_parallel_size=2), "cuda:3")
    assert (child.device, env) == ("cuda:0", {"CUDA_VISIBLE_DEVICES": "3"})
    child, env = engine_settings(Settings(data_parallel_size=2, engine_threads=3), "cpu")
    assert (child.device, child.engine_threads, env) == ("cpu", 3, {})


def test_metrics_label_engines_and_sum_the_http_series():
    a, b = Metrics(), Metrics()
    a.observe_http("/caption", 200, 0.1)
    b.observe_http("/caption", 200, 0.2)
    a.ready.set(1)
    a.queue_depth.set(3)
    text = merge_engine_metrics({0: a.render(), 1: b.render()}, 1, 2).decode()
    lines = set(text.splitlines())
    assert 'blipserve_requests_total{endpoint="/caption",status="200"} 2.0' in lines
    assert 'blipserve_request_latency_seconds_count{endpoint="/caption"} 2.0' in lines
    assert {'blipserve_ready{engine="0"} 1.0', 'blipserve_ready{engine="1"} 0.0'} <= lines
    assert 'blipserve_queue_depth{engine="0"} 3.0' in lines
    assert {"blipserve_engines_ready 1.0", "blipserve_engines 2.0"} <= lines
    assert "_created" not in text


# The real server: N engine processes (tiny checkpoint, CPU).
def _dp_flags(checkpoints, dp: int, *more: str) -> list[str]:
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--engine-threads", "1"]
    return [*flags, "--dp", str(dp), *more]


BODIES = [
    {"max_new_tokens": 6},
    {"max_new_tokens": 6, "num_beams": 2},
    {"max_new_tokens": 6, "do_sample": True, "seed": 7, "temperature": 0.9},
]


async def _post_all(url: str, bodies: list[dict], concurrency: int = 0) -> list:
    """POST every body to /caption (`concurrency` at a time: clients sending their next as one ends)."""
    gate = asyncio.Semaphore(concurrency or len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(body: dict) -> httpx.Response:
            async with gate:
                return await client.post("/caption", json=body)

        return await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)


def _served(url: str) -> dict[str, float]:
    """Requests admitted by each engine (its queue-wait count), by engine label."""
    values = metric_values(url)
    # An --api-workers process still starting shows the series at zero, without engines: skipped.
    return {
        dict(labels)["engine"]: v
        for (name, labels), v in values.items()
        if name == QUEUE_COUNT and "engine" in dict(labels)
    }


QUEUE_COUNT = "blipserve_queue_wait_seconds_count"


def _engine_states(url: str) -> list[str]:
    return [e["state"] for e in httpx.get(url + "/v1/models").json()["data"][0].get("engines", [])]


def _all_engines_ready(url: str, count: int = 2, timeout_s: float = 120) -> None:
    """/ready is 200 once one engine serves (--min-ready-engines 1); the others may still be loading, and
    an --api-workers process may still be starting (its /metrics without engines): wait for all, twice in
    a row (the next connection may reach the other HTTP process)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < 2:
        assert time.monotonic() < deadline, _engine_states(url)
        up = _engine_states(url) == ["ready"] * count and len(_served(url)) == count
        seen = seen + 1 if up else 0
        time.sleep(0.2)


@pytest.mark.slow
def test_two_engines_answer_as_one_greedy_beams_and_seeded_sampling(checkpoints):
    bodies = [{"image": b64(png_bytes(i % 3)), **BODIES[i % 3]} for i in range(12)]
    answers = {}
    for dp in (1, 2):
        with serve_in_process(*_dp_flags(checkpoints, dp)) as (url, proc):
            if dp == 2:
                _all_engines_ready(url)
            responses = asyncio.run(_post_all(url, bodies))
            assert [r.status_code for r in responses] == [200] * 12
            answers[dp] = [r.json()["caption"] for r in responses]
            if dp == 2:
                served = _served(url)
                assert len(served) == 2 and min(served.values()) >= 3, served  # both answered some
                models = httpx.get(url + "/v1/models").json()["data"][0]
                assert [(e["engine"], e["device"], e["state"]) for e in models["engines"]] == [
                    (0, "cpu", "ready"),
                    (1, "cpu", "ready"),
                ]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    assert answers[2] == answers[1]


@pytest.mark.slow
def test_a_slow_engine_serves_less_and_equal_ones_share_200_requests(checkpoints, monkeypatch):
    bodies = [{"image": b64(png_bytes(i % 5)), "max_new_tokens": 4} for i in range(200)]
    monkeypatch.setenv(SLOW_ENGINES, "1:0.05")  # engine 1 sleeps 50 ms per step
    with serve_in_process(*_dp_flags(checkpoints, 2), entry="slow_engines") as (url, proc):
        _all_engines_ready(url)
        before = _served(url)
        responses = asyncio.run(_post_all(url, bodies[:100], concurrency=8))
        assert {r.status_code for r in responses} == {200}
        served = {k: v - before.get(k, 0) for k, v in _served(url).items()}
        assert served["0"] > 2 * served["1"], served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    monkeypatch.delenv(SLOW_ENGINES)
    with serve_in_process(*_dp_flags(checkpoints, 2, "--api-workers", "2")) as (url, proc):
        _all_engines_ready(url)
        before = _served(url)
        responses = asyncio.run(_post_all(url, bodies, concurrency=16))
        assert {r.status_code for r in responses} == {200}
        served = {k: v - before.get(k, 0) for k, v in _served(url).items()}
        assert len(served) == 2 and min(served.values()) > 200 / 3, served
        if shutil.which("promtool"):
            text = httpx.get(url + "/metrics").text
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight_on_every_engine(checkpoints, monkeypatch):
    """Long requests on both engines when SIGTERM comes: each is answered (200), then the server and
    both engines exit 0."""
    monkeypatch.setenv(SLOW_ENGINES, "0:0.02,1:0.02")  # 60 steps take over a second
    flags = _dp_flags(checkpoints, 2, "--max-running-seqs", "2")
    with serve_in_process(*flags, entry="slow_engines") as (url, proc):
        _all_engines_ready(url)
        engines = _spawned_children(proc.pid)
        body = {"max_new_tokens": 60, "min_new_tokens": 60}
        bodies = [{"image": b64(png_bytes(i)), **body} for i in range(8)]

        async def burst() -> list:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.ensure_future(client.post("/caption", json=b)) for b in bodies]
                await asyncio.sleep(1.0)  # every request sent, the first ones decoding
                assert not all(t.done() for t in tasks)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
        assert all(r.json()["usage"]["completion_tokens"] == 60 for r in responses)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in engines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(engines) == 2 and not any(pid_alive(pid) for pid in engines), engines


def _watch_ready(url: str, stop: threading.Event, codes: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            codes.append(httpx.get(url + "/ready", timeout=2).status_code)
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_engine_fails_its_requests_only_comes_back_and_a_restart_loop_ends_the_server(
    checkpoints, monkeypatch
):
    monkeypatch.setenv(SLOW_ENGINES, "0:0.02,1:0.02")  # requests still run at the kill
    flags = _dp_flags(checkpoints, 2, "--max-running-seqs", "2", "--engine-restart-limit", "2")
    with serve_in_process(*flags, entry="slow_engines") as (url, proc):
        _all_engines_ready(url)
        engines = _spawned_children(proc.pid)
        assert len(engines) == 2
        body = {"max_new_tokens": 60, "min_new_tokens": 60}
        bodies = [{"image": b64(png_bytes(i)), **body} for i in range(16)]
        stop, codes = threading.Event(), []
        watcher = threading.Thread(target=_watch_ready, args=(url, stop, codes), daemon=True)
        watcher.start()

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [asyncio.ensure_future(client.post("/caption", json=b)) for b in bodies]
                await asyncio.sleep(0.5)
                os.kill(engines[1], signal.SIGKILL)
                killed = time.monotonic()
                ends = []
                for task in asyncio.as_completed(tasks):
                    r = await task
                    ends.append((r.status_code, time.monotonic() - killed, r))
                return ends

        ends = asyncio.run(burst())
        failed = [(code, t, r) for code, t, r in ends if code != 200]
        assert failed and len(failed) < len(ends), [c for c, _, _ in ends]
        for code, t, r in failed:
            assert code == 503 and t < 1.5 and "engine process died" in r.json()["error"]["message"]
        # Engine 1 is restarted on its device and serves again; /ready never turned 503.
        _all_engines_ready(url, timeout_s=60)
        before = _served(url)
        responses = asyncio.run(
            _post_all(url, [{"image": b64(png_bytes(i)), "max_new_tokens": 3} for i in range(8)])
        )
        assert {r.status_code for r in responses} == {200}
        assert _served(url)["1"] > before.get("1", 0)
        stop.set()
        watcher.join(5)
        assert codes and set(codes) == {200}, codes
        # A second death within the window: a restart loop (--engine-restart-limit 2), the server ends.
        restarted = [p for p in _spawned_children(proc.pid) if p != engines[0]]
        os.kill(restarted[0], signal.SIGKILL)
        assert proc.wait(60) == 1


def test_devices_that_do_not_fit_are_a_usage_error(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--dp", "3", "--devices", "cuda:0", "--host", "127.0.0.1", "--port", "0"])
    assert exit_info.value.code == 2
    assert "--devices names 1 devices for --dp 3" in capsys.readouterr().err


def test_min_ready_engines_above_dp_is_a_usage_error(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--dp", "2", "--min-ready-engines", "3", "--host", "127.0.0.1", "--port", "0"])
    assert exit_info.value.code == 2
    assert "--min-ready-engines 3: more than --dp (2)" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_devices_without_cuda_are_one_line_and_exit_2():
    """--devices is checked as --device is: before any engine starts (it was a restart loop, exit 1)."""
    cmd = [sys.executable, "-m", "server.cli", "--dp", "2", "--devices", "cuda:0,cuda:1", "--port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 2, out.stderr
    assert "--devices cuda:0: no CUDA device is visible" in out.stderr and "Traceback" not in out.stderr
    assert "engine" not in out.stderr.lower(), out.stderr  # nothing was started
