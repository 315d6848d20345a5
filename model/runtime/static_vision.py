"""The vision stage (ViT + Q-Former + projection) at fixed batch sizes, replayed as CUDA graphs.

At small batches the eager vision stage is bound by kernel launches (one image: 19 ms eager, 6 ms as one
graph on an H100). Batches are padded up to the next size of the ladder (1, 2, 4, ... the largest vision
batch): every image is encoded on its own (no op mixes images), so the padded rows change nothing in the
real ones, and their outputs are dropped. Each size is captured at start-up into a static input buffer
and checked against the eager stage; a capture that fails or differs leaves that size eager.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from .device import capture
from .static_decode import row_buckets

log = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]  # pixels [B, 3, H, W] -> embeddings [B, ...]


def batch_ladder(largest: int) -> list[int]:
    """1, 2, 4, ... up to and including `largest` (the decode step's row ladder)."""
    if largest < 1:
        raise ValueError(f"largest vision batch must be >= 1, got {largest}")
    return row_buckets(largest)


class StaticVision:
    def __init__(self, encode: Encode, largest: int, image_shape: tuple[int, int, int], device: torch.device):
        if device.type != "cuda":
            raise ValueError("vision CUDA graphs need a CUDA device")
        self.encode = encode
        self.ladder = batch_ladder(largest)
        self.inputs = torch.zeros((largest, *image_shape), device=device)  # pixels stay fp32, as given
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # The engine thread (prefill misses, retrievals) and the background vision thread (its own
        # stream) may both replay: one at a time on the host, and each replay's stream waits until the
        # last one has copied its outputs out of the shared buffers.
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None

    def bucket(self, batch: int) -> int | None:
        """The captured size that holds `batch` images (None: larger than any)."""
        return next((b for b in self.ladder if b >= batch and b in self.graphs), None)

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every size, largest first (the pool then serves the smaller ones); returns how many."""
        self.inputs.normal_()  # checked on random pixels, not on zeros
        for size in reversed(self.ladder):
            try:
                self._capture(size)
            except Exception as exc:
                log.error(
                    "vision CUDA graph at batch %d failed (%s: %s); eager there",
                    size,
                    type(exc).__name__,
                    exc,
                )
        return len(self.graphs)

    def _capture(self, size: int) -> None:
        graph, out, want = capture(lambda: self.encode(self.inputs[:size]), self.pool)
        if not torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2):
            log.error("vision CUDA graph at batch %d differs from the eager stage; eager there", size)
            return
        self.graphs[size] = (graph, out)

    def run(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """Embeddings of `pixels` [n, 3, H, W] (on the device) by graph replay; None if no size fits."""
        n = pixels.shape[0]
        size = self.bucket(n)
        if size is None:
            return None
        graph, out = self.graphs[size]
        with self._lock:
            stream = torch.cuda.current_stream()
            if self._done is not None:
                stream.wait_event(self._done)
            self.inputs[:n].copy_(pixels, non_blocking=True)
            graph.replay()
            result = out[:n].clone()  # the next replay overwrites `out`
            self._done = torch.cuda.Event()
            self._done.record(stream)
        return result
