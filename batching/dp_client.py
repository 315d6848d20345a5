"""An HTTP process's side of --dp N engines: one `ProcessClient` (DEALER) per engine, and the router.

Each request goes to the engine with the least load: the waiting and running counts the engine sent
with its last ack or result, plus the requests this process has sent it and not yet seen acknowledged;
ties go to one with a free KV slot (a request there starts at once), then rotate. With `image-affinity` the engine an image key
hashes to (rendezvous hashing: the highest hash of key and engine; adding or losing an engine moves only
its share of the keys) comes first unless it is clearly busier than the least loaded one. An engine
whose queue is full (its ack says so) passes the request to the next: 429 only when all are full.
A request remembers its engine (`ticket.extra["engine"]`), so cancelling reaches the one that holds it.
An engine that dies fails its own requests (503) and is skipped until the restarted one answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from typing import Any

from batching import EngineStopped, QueueFull
from batching.client import EngineClient, Ticket
from batching.protocol import Info
from model.data.tokenizer import TextTokenizer

from .engine_process import EngineHandle
from .metrics import merge_engine_metrics
from .process_client import EngineDied, ProcessClient

log = logging.getLogger(__name__)

# image-affinity: the hashed engine is "clearly busier" when its load exceeds the least by more than this
# many requests plus this share of the least (a short queue's difference is no reason to lose the cache).
AFFINITY_SLACK = 2
AFFINITY_RATIO = 0.5


def rendezvous(key: str, engines: list[int]) -> int:
    """The engine among `engines` that `key` hashes to: the highest blake2b(key, engine) (stable across
    processes, unlike `hash`). Source: Thaler & Ravishankar, highest random weight hashing (1998)."""

    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{key}\0{i}".encode(), digest_size=8).digest()

    return max(engines, key=weight)


class DataParallelClient(EngineClient):
    """The `EngineClient` API over N engine processes (see the module's docstring)."""

    def __init__(
        self,
        handles: list[EngineHandle],
        routing: str = "load",
        min_ready: int = 1,
        poll_s: float = 0.2,
    ):
        super().__init__()
        self.links = [ProcessClient(h.address, None, poll_s, h.pid, rejoin=True) for h in handles]
        self.devices = [h.device for h in handles]
        self.routing = routing
        self.min_ready = min_ready
        self._turn = itertools.count()

    def use_tokenizer(self, tokenizer: TextTokenizer) -> None:
        """Each engine's link makes the text of its requests (its tickets gather their tokens)."""
        super().use_tokenizer(tokenizer)
        for link in self.links:
            link.use_tokenizer(tokenizer)

    @property
    def ready_engines(self) -> int:
        return sum(link.healthy for link in self.links)

    @property
    def healthy(self) -> bool:
        return self.ready_engines >= self.min_ready

    @property
    def pending(self) -> int:
        return sum(link.pending for link in self.links)

    async def connect(self) -> Info:
        """Connect to every engine; return once `min_ready` of them have loaded their models (the
        others join when they have)."""
        for link in self.links:
            await link.open()
        while not self.healthy:
            await asyncio.sleep(0.05)
        return next(link.info for link in self.links if link.healthy)

    def load_of(self, i: int) -> int:
        """Engine `i`'s load as this process sees it: waiting + running (as of its last message, or
        what this process holds there before any) + sent and not yet acknowledged."""
        link = self.links[i]
        base = link.load.waiting + link.load.running if link.load is not None else link.pending
        return base + link.unacked

    def order(self, image_key: str = "") -> list[int]:
        """Healthy engines in the order to try them (see the module's docstring)."""
        up = [i for i, link in enumerate(self.links) if link.healthy]
        if not up:
            return []
        turn = next(self._turn)
        n = len(self.links)

        def key(i: int) -> tuple[int, bool, int]:
            load = self.links[i].load
            return self.load_of(i), load is not None and load.free_slots == 0, (i - turn) % n

        ranked = sorted(up, key=key)
        if self.routing == "image-affinity" and image_key:
            home = rendezvous(image_key, up)
            least = self.load_of(ranked[0])
            if self.load_of(home) <= least + AFFINITY_SLACK + AFFINITY_RATIO * least:
                ranked.remove(home)
                ranked.insert(0, home)
        return ranked

    async def add(
        self, request: Any, timeout_s: float | None = None, stream: bool = False, trace: bool = False
    ) -> Ticket:
        """Queue on the least loaded engine that takes it; QueueFull only when every engine's queue is
        full, EngineStopped when none is up; ValueError as the engine's. `stream`, `trace`: as
        `ProcessClient.add`'s."""
        full = False
        for i in self.order(getattr(request, "image_key", "") or ""):
            try:
                ticket = await self.links[i].add(request, timeout_s, stream, trace)
            except QueueFull:
                full = True
                continue
            except (EngineStopped, EngineDied):  # died or draining before it acknowledged: the next one
                continue
            ticket.extra["engine"] = i
            return ticket
        if full:
            raise QueueFull(f"every engine's queue is full ({len(self.links)} engines)")
        raise EngineStopped("no engine is up (the server restarts them)")

    def cancel(self, ticket: Ticket) -> None:
        self.links[ticket.extra.get("engine", 0)].cancel(ticket)

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        """To one engine that is up (the HTTP series are summed over engines in /metrics)."""
        for link in self.links:
            if link.healthy:
                link.record_http(endpoint, status, seconds)
                return

    async def metrics_text(self) -> bytes:
        """Every engine's registry, its series labelled `engine`, the HTTP series summed, and
        `blipserve_engines_ready`."""
        up = [(i, link) for i, link in enumerate(self.links) if link.healthy]
        texts = await asyncio.gather(*(link.metrics_text() for _, link in up), return_exceptions=True)
        got = {i: t for (i, _), t in zip(up, texts, strict=True) if isinstance(t, bytes)}
        return merge_engine_metrics(got, self.ready_engines, len(self.links))

    def describe_engines(self) -> list[dict]:
        """/v1/models: each engine's index, device, state and process id."""
        out = []
        for i, link in enumerate(self.links):
            state = "ready" if link.healthy else ("restarting" if link.deaths else "loading")
            entry = {"engine": i, "device": self.devices[i] or None, "state": state, "pid": link.pid}
            entry["restarts"] = link.deaths
            out.append(entry)
        return out

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
