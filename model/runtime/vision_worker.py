"""The vision stage in the background: ViT + Q-Former batches run while the decode steps go on.

A running sequence should wait for at most one decode step between two of its tokens, not for the
vision batch of every newcomer. So newcomers' images are encoded on a worker thread (torch releases the
GIL in its kernels), on CUDA on a stream of its own: the decode step, bound by memory bandwidth, and the
ViT, bound by arithmetic, share the GPU. The engine thread collects finished batches at each step and
only then prefills their requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass
class VisionBatch:
    keys: list[str]
    future: Future
    # Filled in when collected.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


Encode = Callable[[list[str]], torch.Tensor]  # image keys -> their embeddings [len(keys), ...]


class VisionWorker:
    """Runs vision batches one at a time on a worker thread (in submission order)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blipserve-vision")
        self.jobs: list[VisionBatch] = []

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def submit(self, keys: list[str], encode: Encode) -> None:
        self.jobs.append(VisionBatch(keys, self.pool.submit(self._run, keys, encode)))

    def _run(self, keys: list[str], encode: Encode) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            embeds = encode(keys)
            if self.cuda:
                self.stream.synchronize()  # done means done: the engine thread may read them at once
        return embeds, time.perf_counter() - start

    def collect(self, wait: bool) -> list[VisionBatch]:
        """Batches finished by now; with `wait`, block for the oldest one if none has."""
        if wait and self.jobs and not any(j.future.done() for j in self.jobs):
            self.jobs[0].future.exception()  # blocks until it ends, whatever the outcome
        done = [j for j in self.jobs if j.future.done()]
        self.jobs = [j for j in self.jobs if not j.future.done()]
        for job in done:
            error = job.future.exception()
            if error is not None:
                job.error = f"{type(error).__name__}: {error}"
                continue
            embeds, job.seconds = job.future.result()
            for key, value in zip(job.keys, embeds, strict=True):
                if self.cuda:
                    # Made on the worker's stream, read on the engine's: the allocator must not reuse
                    # the memory before the engine's stream is done with it.
                    value.record_stream(torch.cuda.current_stream())
                job.embeddings[key] = value
        return done

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
