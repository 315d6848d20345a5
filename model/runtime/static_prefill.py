"""The prefill at fixed shapes, replayed as CUDA graphs on GPU.

An eager prefill of one request is some 400 small kernels and several host waits (token ids copied up
from pageable memory, the last position of each prompt looked up): 11 ms on an H100 for what the GPU
does in about 1-2 ms. Here a prefill runs at a (rows, positions) bucket, on inputs already on the device:

- **Rows** are requests, padded up to the next of 1, 2, 4, ... `max_rows`; a padded row writes its keys
  and values to the cache's spare "trash" slot (the decode step's) and its logits are dropped. More
  requests than `max_rows` run as several chunks.
- **Positions** are the 32 (`num_query_tokens`) query positions and the prompt, right-padded up to the
  next bucket: under the causal mask no real token sees a pad, and the pads' keys/values, written past
  each prompt, are masked out and overwritten by the decode steps.
- **Inputs** go up in one copy from page-locked memory: the token ids [rows, positions] (whatever sits at
  the query positions: the query embeddings replace it), each row's last prompt position and its slot.
  The query embeddings are copied on the device into a static buffer.

Each bucket is captured before traffic and checked against the eager run; a bucket that fails to capture
or disagrees stays eager (`model.prefill`). On the CPU the runner prefills eagerly at exact shapes; the
tests run this fixed-shape step there to show that it computes the same and reads nothing back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..arch.kv_cache import KVCache
from .device import capture, copy_from_host
from .static_decode import checked_device, row_buckets

log = logging.getLogger(__name__)

# (ids [R, T], queries [R, nq, hidden], last [R], slots [R], cache) -> logits [R, vocab] fp32: the
# model's `prefill_static`.
PrefillFn = Callable[..., torch.Tensor]


def length_buckets(num_queries: int, max_len: int) -> list[int]:
    """Query positions plus 8, 16, 32, ... prompt positions, up to and including `max_len`."""
    if max_len <= num_queries:
        raise ValueError(f"max_len {max_len} leaves no room for a prompt after {num_queries} queries")
    sizes, extra = [], 8
    while num_queries + extra < max_len:
        sizes.append(num_queries + extra)
        extra *= 2
    return [*sizes, max_len]


class StaticPrefill:
    """Prefills at bucketed shapes; `graphs`: as CUDA graphs (captured by `capture_all`)."""

    def __init__(
        self,
        prefill: PrefillFn,
        cache: KVCache,
        num_slots: int,
        queries_shape: tuple[int, int],
        dtype: torch.dtype,
        max_rows: int = 32,
        graphs: bool = True,
    ):
        device = checked_device(cache.k, num_slots, graphs)
        self.prefill, self.cache, self.device = prefill, cache, device
        self.trash = num_slots
        self.num_queries = queries_shape[0]
        self.rows_ladder = row_buckets(min(max_rows, num_slots))
        self.len_ladder = length_buckets(self.num_queries, cache.max_len)
        rows, length = self.rows_ladder[-1], self.len_ladder[-1]
        # Token ids, last positions and slots of a bucket, one after the other (`_inputs`): one copy up.
        self.flat = torch.zeros(rows * length + 2 * rows, dtype=torch.long, device=device)
        self.queries = torch.zeros((rows, *queries_shape), dtype=dtype, device=device)
        self.graphs_on = graphs
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.tried: set[tuple[int, int]] = set()  # buckets whose capture was attempted
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def bucket(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, positions) of the bucket that holds `rows` prompts of at most `longest` positions."""
        r = next((b for b in self.rows_ladder if b >= rows), None)
        t = next((b for b in self.len_ladder if b >= longest), None)
        if r is None or t is None:
            raise ValueError(
                f"{rows} prompts of {longest} positions exceed the largest bucket "
                f"({self.rows_ladder[-1]}, {self.len_ladder[-1]})"
            )
        return r, t

    def _inputs(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bucket's views of the static inputs: ids [rows, length], last [rows], slots [rows]."""
        n = rows * length
        return self.flat[:n].view(rows, length), self.flat[n : n + rows], self.flat[n + rows : n + 2 * rows]

    def step(self, rows: int, length: int) -> torch.Tensor:
        """The fixed-shape prefill on the static inputs (what a graph captures): logits [rows, vocab]."""
        ids, last, slots = self._inputs(rows, length)
        return self.prefill(ids, self.queries[:rows], last, slots, self.cache)

    @torch.inference_mode()
    def run(self, queries: list[torch.Tensor], texts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Logits [n, vocab] after each prompt: query embeddings `queries[i]` [nq, hidden] (on the
        device), then token ids `texts[i]`, written to cache slot `slots[i]`."""
        if not (len(queries) == len(texts) == len(slots)) or not slots:
            raise ValueError(
                f"queries, texts and slots need equal non-zero lengths, got {len(queries)}, {len(texts)}, {len(slots)}"
            )
        most = self.rows_ladder[-1]
        chunks = [
            self._run(queries[i : i + most], texts[i : i + most], slots[i : i + most])
            for i in range(0, len(slots), most)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _run(self, queries: list[torch.Tensor], texts: list[list[int]], slots: list[int]) -> torch.Tensor:
        n, nq = len(slots), self.num_queries
        rows, length = self.bucket(n, nq + max(len(t) for t in texts))
        entry = self._graph(rows, length)  # first: a capture fills the static inputs with its own data
        ids = [[0] * length for _ in range(rows)]
        for row, text in zip(ids, texts, strict=False):
            row[nq : nq + len(text)] = text
        last = [nq + len(t) - 1 for t in texts] + [0] * (rows - n)
        where = slots + [self.trash] * (rows - n)
        host = torch.tensor([i for row in ids for i in row] + last + where, dtype=torch.long)
        copy_from_host(self.flat[: host.numel()], host)
        self.queries[:n].copy_(torch.stack(queries))
        if entry is None:
            return self.step(rows, length)[:n]
        graph, out = entry
        graph.replay()
        return out[:n].clone()  # the next replay overwrites `out`

    def _graph(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The bucket's graph, captured now if it has not been tried yet (the server captures every
        bucket before traffic; offline calls capture the buckets they use)."""
        if not self.graphs_on:
            return None
        if (rows, length) not in self.tried:
            self._capture(rows, length)
        return self.graphs.get((rows, length))

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket, largest first (the pool then serves the smaller ones); returns how many."""
        if not self.graphs_on:
            return 0
        for rows in reversed(self.rows_ladder):
            for length in reversed(self.len_ladder):
                self._graph(rows, length)
        return len(self.graphs)

    def _capture(self, rows: int, length: int) -> None:
        self.tried.add((rows, length))
        ids, last, slots = self._inputs(rows, length)
        # Every row idle: the warm-up, the capture and the check write only to the trash slot; checked
        # on random inputs, not on zeros.
        ids.random_(0, 2)
        last.fill_(length - 1)
        slots.fill_(self.trash)
        self.queries[:rows].normal_()
        try:
            graph, out, want = capture(lambda: self.step(rows, length), self.pool)
        except Exception as exc:  # noqa: BLE001 - a failed capture leaves that bucket eager
            log.error(
                "prefill CUDA graph at %s failed (%s: %s); eager there",
                (rows, length),
                type(exc).__name__,
                exc,
            )
            return
        if torch.allclose(out, want, rtol=1e-2, atol=1e-2):
            self.graphs[(rows, length)] = (graph, out)
        else:
            log.error("prefill CUDA graph at %s differs from the eager run; eager there", (rows, length))
