"""Work for an HTTP request that stops when its client goes away: a 499, and the engine frees the
request's place (queue entry, KV slots) at once instead of finishing work no one reads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from ..errors import ApiError
from ..service import Outcome, Service

T = TypeVar("T")
POLL_S = 0.05  # how often the client's connection is checked


async def until_disconnected(request: Request) -> None:
    """Return once the client of `request` has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(POLL_S)


async def unless_disconnected(request: Request, job: Awaitable[T]) -> T:
    """Await `job`, cancelling it (ApiError 499) as soon as the client goes away."""
    work = asyncio.ensure_future(job)
    watch = asyncio.ensure_future(until_disconnected(request))
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        raise ApiError(499, "client disconnected")
    watch.cancel()
    return work.result()


async def generate(request: Request, svc: Service, jobs: list) -> list[Outcome]:
    """Generate for every job (`GenerationRequest`s), but give up (freeing the KV slots) as soon as the
    client goes away."""
    return await unless_disconnected(request, svc.generate(jobs))
