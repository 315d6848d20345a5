"""The engine-process boundary: the wire format, the engine core over a real ZMQ socket (with a stand-in
runner), and the real server split in processes: crashes, several HTTP processes, metrics summed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import torch
from live import b64, png_bytes, serve_in_process
from test_batching import EOS, FakeRequest, FakeRunner, request
from test_server import metric_values

from batching import EngineCore, EngineStopped, QueueFull, Scheduler, SequenceFailed
from batching.engine_io import EngineIO
from batching.process_client import HTTP_FLUSH_S, ProcessClient
from batching.protocol import (
    Add,
    Done,
    Info,
    Progress,
    StepOutputs,
    add_message,
    decode_from_engine,
    decode_to_engine,
    encode,
    pixels_of,
)
from model.data.detokenizer import NewTokens
from model.decoding.generation import SamplingParams, TokenLogprob
from model.runtime.plan import RetrievalOutput, RetrievalRequest


def test_requests_cross_with_their_pixels_and_results_come_back_whole():
    pixels = torch.randn(3, 8, 6)
    req = request(3)
    req.pixel_values, req.text_ids, req.prompt_ids = pixels, [2, 5, 7], [9, 9, 2, 5, 7]
    req.params = SamplingParams(max_new_tokens=7, num_beams=2, n=2, stop=("a b",), logprobs=2)
    frames = add_message(4, req, 1.5, True)
    msg = decode_to_engine(frames[0])
    assert isinstance(msg, Add) and (msg.req_id, msg.timeout_s, msg.stream) == (4, 1.5, True)
    assert (msg.text_ids, msg.prompt_ids, msg.params, msg.image_key) == (
        req.text_ids,
        req.prompt_ids,
        req.params,
        req.image_key,
    )
    assert torch.equal(pixels_of(msg, bytes(frames[1])), pixels)
    with pytest.raises(ValueError, match="expected shape"):
        pixels_of(msg, bytes(frames[1])[:-4])

    retrieval = RetrievalRequest("match", pixels, "key", [[1, 2], [3]])
    msg = decode_to_engine(add_message(5, retrieval, None, False)[0])
    assert (msg.task, msg.texts, msg.params) == ("match", [[1, 2], [3]], None)

    # Pixels before normalising (what a CUDA engine is sent): uint8 [H, W, 3], a quarter of the bytes.
    req.pixel_values = torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8)
    frames = add_message(6, req, None, False)
    msg = decode_to_engine(frames[0])
    assert msg.pixel_dtype == "uint8" and len(frames[1]) == 8 * 6 * 3
    assert torch.equal(pixels_of(msg, bytes(frames[1])), req.pixel_values)

    lps = [TokenLogprob(4, -0.5, ((4, -0.5), (6, -1.25)))]
    outputs = [NewTokens([4, 8], "stop", lps), NewTokens([3], "length", None)]
    for message in (
        Done(4, "stop", 0.25, outputs, None),
        Done(5, "stop", 0.0, [], RetrievalOutput([0.5], [0.25], [[1.0, 0.0]], [])),
        Progress(4, outputs, 0.5),
        StepOutputs([Progress(4, outputs, 0.5), Progress(7, outputs[:1], 0.0)], [Done(5, "length", 0.1)]),
    ):
        assert decode_from_engine(encode(message)) == message


class Engine:
    """An `EngineIO` with a stand-in runner on a thread, listening on a real ipc socket; `inline`: the
    loop's thread receives between steps (a CPU engine) instead of an I/O thread (CUDA)."""

    def __init__(
        self,
        tmp: Path,
        num_slots: int = 2,
        max_queue: int = 4,
        step_s: float = 0.0,
        inline: bool = False,
        max_wait_ms: float = 0,
        observe_http=None,
    ):
        self.scheduler = Scheduler(num_slots, max_queue, 4, (EOS,))
        self.runner = FakeRunner(step_s=step_s)
        self.loop = EngineCore(self.runner, self.scheduler, max_wait_ms=max_wait_ms)
        info = Info("fake", "cpu", "float32", os.getpid())
        build = lambda msg, px: _fake_request(msg)  # noqa: E731
        core = EngineIO(self.loop, build, info, lambda: b"m 1\n", observe_http or _ignore, inline=inline)
        self.core = core
        self.address = f"ipc://{tmp}/engine.sock"
        self.thread = threading.Thread(target=core.serve, args=(self.address,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.stop_accepting(drain=True)
        self.thread.join(10)

    def run(self, body: Callable[[ProcessClient], Awaitable[None]]) -> None:
        """`body(client)` with a connected ProcessClient; the client closed and the engine stopped
        whatever happens (a zmq context left open would hang pytest's exit)."""

        async def main() -> None:
            client = ProcessClient(self.address, self.thread.is_alive)
            try:
                await client.connect()
                await body(client)
            finally:
                await client.close()

        try:
            asyncio.run(main())
        finally:
            self.stop()


def _ignore(*args) -> None:
    pass


def _fake_request(msg: Add) -> FakeRequest:
    return FakeRequest(0, msg.image_key, None, msg.text_ids, msg.prompt_ids, msg.params)


def _req(tokens: int, key: str = "img"):
    r = request(tokens)
    r.image_key = key
    r.params = SamplingParams(max_new_tokens=tokens + 1)
    return r


@pytest.mark.parametrize("inline", [False, True], ids=["io-thread", "inline"])
def test_engine_core_serves_results_progress_cancellation_and_a_global_queue_bound(tmp_path, inline):
    engine = Engine(tmp_path, num_slots=1, max_queue=2, step_s=0.002, inline=inline)

    async def serve(client: ProcessClient) -> None:
        assert client.info.model_id == "fake"
        io_threads = [t for t in threading.enumerate() if t.name == "blipserve-io"]
        assert len(io_threads) == (0 if inline else 1)  # inline: the loop's thread has the socket
        done = await asyncio.gather(*(client.submit(_req(n + 1)) for n in range(2)))
        # FakeRunner emits 1, 2, ... up to the request's count, then EOS (see test_batching).
        assert [d.outputs[0].tokens for d in done] == [[1, EOS], [1, 2, EOS]]
        with pytest.raises(SequenceFailed):
            await client.submit(_req(2, "bad"))

        ticket = await client.add(_req(3), stream=True)
        done = await client.wait(ticket)
        seen = []
        while not ticket.progress.empty():
            seen.append([(u.tokens, u.finish_reason) for u in ticket.progress.get_nowait()])
        # Each report carries only the step's new token; the last update (from the Done) the finish reason.
        assert seen == [[([1], None)], [([2], None)], [([3], None)], [([EOS], None)], [([], "stop")]]
        assert done.outputs[0].tokens == [1, 2, 3, EOS]

        # One slot, a queue of two: the fourth request at once is refused by the engine itself.
        endless = [await client.add(_req(100_000)) for _ in range(3)]
        with pytest.raises(QueueFull):
            await client.add(_req(1))
        for t in endless:
            client.cancel(t)
        results = await asyncio.gather(*(client.wait(t) for t in endless), return_exceptions=True)
        assert all(isinstance(r, SequenceFailed) and r.reason == "cancelled" for r in results)
        assert (await client.submit(_req(1))).finish_reason == "stop"  # the slot is free again

        with pytest.raises(SequenceFailed, match="timeout"):
            await client.submit(_req(100_000), timeout_s=0.05)
        assert await client.metrics_text() == b"m 1\n"
        engine.loop.stop_accepting(drain=True)
        with pytest.raises(EngineStopped):
            await client.add(_req(1))

    engine.run(serve)
    assert not engine.thread.is_alive() and len(engine.scheduler.free_slots) == 1


@pytest.mark.parametrize("inline", [False, True], ids=["io-thread", "inline"])
def test_an_idle_engine_gathers_a_vision_batch_for_max_wait_in_both_modes(tmp_path, inline):
    """Three requests sent together to an idle engine with a 300 ms max wait: one vision batch, not a
    step for the first alone; and the wait ends as soon as the batch is full (4 images)."""
    engine = Engine(tmp_path, num_slots=8, max_queue=8, inline=inline, max_wait_ms=300)

    async def batches(client: ProcessClient) -> None:
        start = time.monotonic()
        await asyncio.gather(*(client.submit(_req(1, f"img{i}")) for i in range(3)))
        waited = time.monotonic() - start
        assert sorted(engine.runner.plans[0].encode) == ["img0", "img1", "img2"]
        assert 0.25 < waited < 2
        engine.runner.plans.clear()
        start = time.monotonic()
        await asyncio.gather(*(client.submit(_req(1, f"full{i}")) for i in range(4)))
        assert len(engine.runner.plans[0].encode) == 4 and time.monotonic() - start < 0.25

    engine.run(batches)
    assert not engine.thread.is_alive()


def test_http_outcomes_reach_the_engine_gathered_and_before_a_metrics_query(tmp_path):
    """Each HTTP process sends its requests' outcomes in one message per HTTP_FLUSH_S, not one per request;
    its own metrics query sends what it holds first, so that query's answer counts them."""
    seen: list[tuple] = []
    engine = Engine(tmp_path, inline=True, observe_http=lambda *o: seen.append(o))

    async def observe(client: ProcessClient) -> None:
        for i in range(3):
            client.record_http("/caption", 200, 0.1 * i)
        await asyncio.sleep(HTTP_FLUSH_S / 4)
        assert seen == []  # gathered, not sent yet
        await asyncio.sleep(HTTP_FLUSH_S * 2)
        assert seen == [("/caption", 200, 0.0), ("/caption", 200, 0.1), ("/caption", 200, 0.2)]
        client.record_http("/vqa", 422, 0.5)
        assert await client.metrics_text() == b"m 1\n" and seen[-1] == ("/vqa", 422, 0.5)

    engine.run(observe)


def test_the_inline_loop_sleeps_through_a_gather_wait_and_survives_a_message_it_cannot_handle(tmp_path):
    """A 30 ms gather wait is a few polls, not a spin through its last millisecond (pyzmq truncates a
    float timeout); a request whose handling raises (our bug) fails alone, as a RuntimeError (a 500),
    and the engine goes on serving."""
    engine = Engine(tmp_path, inline=True, max_wait_ms=30)
    calls = {"due_in": 0}
    due_in = engine.loop.due_in

    def counted() -> float | None:
        calls["due_in"] += 1
        return due_in()

    engine.loop.due_in = counted
    build = engine.core.build_request
    engine.core.build_request = lambda msg, px: 1 / 0 if msg.image_key == "bug" else build(msg, px)

    async def requests(client: ProcessClient) -> None:
        await asyncio.sleep(0.3)  # idle: a poll per 100 ms
        calls["due_in"] = 0
        assert (await client.submit(_req(1))).finish_reason == "stop"
        assert calls["due_in"] < 30, calls
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            await asyncio.wait_for(client.add(_req(1, "bug")), 5)
        assert (await client.submit(_req(1))).finish_reason == "stop"

    engine.run(requests)


def test_a_metrics_query_during_a_long_inline_step_times_out_and_then_answers(tmp_path, monkeypatch):
    """On CPU the engine answers between steps: a query that outlives METRICS_TIMEOUT_S raises
    TimeoutError (/metrics says 503), and the next one, after the step, is answered."""
    monkeypatch.setattr("batching.process_client.METRICS_TIMEOUT_S", 0.1)
    engine = Engine(tmp_path, inline=True, step_s=0.6)

    async def queries(client: ProcessClient) -> None:
        ticket = await client.add(_req(0))  # one step: prefill, EOS
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await client.metrics_text()
        await client.wait(ticket)
        assert await client.metrics_text() == b"m 1\n"

    engine.run(queries)


def test_a_rejoining_client_logs_a_first_join_as_joined_not_as_back(tmp_path, caplog):
    """--dp's links say Hello through the rejoin path at start too: no engine has died then."""
    engine = Engine(tmp_path, inline=True)

    async def main():
        client = ProcessClient(engine.address, engine.thread.is_alive, rejoin=True, poll_s=0.01)
        try:
            await client.open()
            for _ in range(200):
                if client.healthy:
                    break
                await asyncio.sleep(0.01)
            assert client.healthy
        finally:
            await client.close()

    with caplog.at_level("INFO", logger="batching.process_client"):
        try:
            asyncio.run(main())
        finally:
            engine.stop()
    lines = [r.getMessage() for r in caplog.records if "engine on" in r.getMessage()]
    assert lines == [f"engine on cpu joined (pid {os.getpid()})"]


@pytest.mark.parametrize("inline", [False, True], ids=["io-thread", "inline"])
def test_a_dead_engine_fails_open_requests_at_once(tmp_path, inline):
    engine = Engine(tmp_path, num_slots=1, step_s=0.002, inline=inline)
    alive = {"yes": True}

    async def main():
        client = ProcessClient(engine.address, lambda: alive["yes"], poll_s=0.01)
        deaths = []
        client.on_engine_death = lambda: deaths.append(1)
        await client.connect()
        ticket = await client.add(_req(100_000))
        alive["yes"] = False  # as if the process had exited
        start = time.monotonic()
        with pytest.raises(SequenceFailed, match="engine_died"):
            await client.wait(ticket)
        assert time.monotonic() - start < 1 and deaths == [1] and not client.healthy
        with pytest.raises(EngineStopped):
            await client.add(_req(1))
        await client.close()

    try:
        asyncio.run(main())
    finally:
        for seq in list(engine.scheduler.running):
            engine.loop.cancel(seq)
        engine.stop()


@pytest.mark.slow  # a process kill: a server process and its engine started for it
def test_killing_the_engine_fails_requests_with_503_and_the_server_exits_nonzero(checkpoints):
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--max-running-seqs", "2"]
    with serve_in_process(*flags) as (url, proc):
        engine = _spawned_children(proc.pid)[0]  # the engine process is started first
        # Two slots, two beams: one request at a time, each 100 steps; 24 of them take seconds.
        body = {"max_new_tokens": 100, "min_new_tokens": 100, "num_beams": 2}
        bodies = [{"image": b64(png_bytes(i)), **body} for i in range(24)]

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                tasks = [asyncio.ensure_future(client.post("/caption", json=b)) for b in bodies]
                await asyncio.sleep(0.3)
                os.kill(engine, signal.SIGKILL)
                start = time.monotonic()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return results, time.monotonic() - start

        results, waited = asyncio.run(burst())
        assert waited < 10
        codes = [getattr(r, "status_code", None) for r in results]
        failed = [r for r in results if getattr(r, "status_code", 200) != 200]
        assert failed, codes
        for r in failed:
            assert r.status_code == 503 and "engine process died" in r.json()["error"]["message"]
        assert proc.wait(30) == 1


@pytest.mark.slow  # a server process started for it
def test_sigterm_drains_and_exits_0_with_the_thread_engine_too(checkpoints):
    """uvicorn re-raises the signal after its drain: the process must still end with status 0."""
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--engine", "thread"]
    with serve_in_process(*flags) as (url, proc):
        body = {"image": b64(png_bytes(5)), "max_new_tokens": 30, "min_new_tokens": 30}

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [asyncio.ensure_future(client.post("/caption", json=body)) for _ in range(6)]
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        assert {r.status_code for r in asyncio.run(burst())} == {200}
        assert proc.wait(60) == 0


@pytest.mark.slow  # three processes (two HTTP, one engine) started for it
def test_two_http_processes_share_one_engine_queue_and_metrics(checkpoints):
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--api-workers", "2"]
    with serve_in_process(*flags) as (url, proc):
        body = {"image": b64(png_bytes(3)), "max_new_tokens": 4}

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/caption", json=body) for _ in range(12)))

        responses = asyncio.run(burst())
        assert {r.status_code for r in responses} == {200}
        assert len({r.json()["caption"] for r in responses}) == 1  # same image, same greedy caption
        chat = {
            "model": httpx.get(url + "/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(3)}}]}],
            "max_tokens": 4,
        }
        # Both processes' warm-up requests (one each) are counted before the baseline is taken: a worker
        # that the burst did not reach may still be warming up (its first token counted late otherwise).
        ttft = ("blipserve_time_to_first_token_seconds_count", ())
        deadline = time.monotonic() + 60
        while metric_values(url)[ttft] < len(responses) + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        before = metric_values(url)
        assert before[ttft] == len(responses) + 2
        for _ in range(3):
            assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        # Both workers answered (each has its own warm-up); each counts into the engine's registry, the
        # other worker's within its flush interval.
        caption = ("blipserve_requests_total", (("endpoint", "/caption"), ("status", "200")))
        deadline = time.monotonic() + 10
        while metric_values(url).get(caption, 0) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # and nothing more comes
        values = metric_values(url)
        assert values[(("blipserve_requests_total"), (("endpoint", "/caption"), ("status", "200")))] == 12
        chats = (("endpoint", "/v1/chat/completions"), ("status", "200"))
        assert values[("blipserve_requests_total", chats)] == 3
        assert (
            values[("blipserve_request_latency_seconds_count", (("endpoint", "/v1/chat/completions"),))] == 3
        )

        def grew(name: str) -> float:
            return values[(name, ())] - before[(name, ())]

        assert grew("blipserve_time_to_first_token_seconds_count") == 3  # the engine counts each once
        prompt = responses[0].json()["usage"]["prompt_tokens"]  # a caption's, as a chat's without text
        assert grew("blipserve_prompt_tokens_total") == 3 * prompt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def _url(seed: int) -> str:
    return "data:image/png;base64," + b64(png_bytes(seed))


def _spawned_children(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            out.append(int(child))
    return sorted(out)


@pytest.mark.slow  # a process kill and a restart: ~15 s on 2 cores
def test_a_dead_http_process_is_replaced_and_the_server_keeps_serving(checkpoints):
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--api-workers", "2"]
    with serve_in_process(*flags) as (url, proc):
        engine, *workers = _spawned_children(proc.pid)  # the engine process is started first
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _spawned_children(proc.pid)
            if len(now) == 3 and workers[0] not in now:
                break
            time.sleep(0.2)
        assert engine in now and workers[0] not in now and len(now) == 3, now
        body = {"image": b64(png_bytes(9)), "max_new_tokens": 3}
        codes = {httpx.post(url + "/caption", json=body, timeout=30).status_code for _ in range(8)}
        assert codes == {200}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
