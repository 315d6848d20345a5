"""Small helpers for work on the device: host lists to the device without a sync, and CUDA graph capture.

A `torch.tensor(values, device="cuda")` copies from pageable memory: the host waits for the copy (and so
for the device work queued before it). From page-locked memory the copy is queued like a kernel and the
host goes on; the caching host allocator keeps the page until the copy is done, then reuses it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

import torch


def host_longs(values: Sequence[int]) -> torch.Tensor:
    """Python ints as an int64 CPU tensor: through `array` (a few times faster than `torch.tensor` on a
    list, which converts element by element; the tensor keeps the array alive)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)


def device_index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small list of ints as a long tensor on `device`, copied without making the host wait."""
    return to_device(host_longs(values), device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; on CUDA through page-locked memory, asynchronously."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, host: torch.Tensor) -> None:
    """`dst` (on any device) takes `host`'s values; on CUDA from page-locked memory, asynchronously
    and straight into `dst` (no intermediate tensor on the device)."""
    dst.copy_(host.pin_memory() if dst.is_cuda else host, non_blocking=True)


def capture(
    fn: Callable[[], torch.Tensor], pool: tuple
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """Capture `fn` as a CUDA graph in memory pool `pool` and replay it once.

    `fn` is first run on a side stream (lazy initialisation, cuBLAS workspaces: nothing of that may
    happen during a capture). Returns the graph, the output tensor its replays write, and the eager
    output for the caller to check the replay against."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        eager = fn().clone()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    graph.replay()
    return graph, out, eager
