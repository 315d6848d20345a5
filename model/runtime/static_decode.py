"""The decode step at fixed shapes, replayed as CUDA graphs on GPU.

A decode step is small kernels over a small batch: on a GPU its time is mostly the CPU launching them.
Captured once as a CUDA graph per shape and replayed, a step costs one launch. A graph needs fixed
shapes and fixed addresses, so the step here is shaped by buckets, not by the live batch:

- **Rows are cache slots.** Row r of the step is slot r and reads that slot's keys/values in place (a
  view of the cache, no gather). The rows run are slots [0, rows) with `rows` the next bucket above the
  highest slot decoding; the scheduler hands out the lowest free slots, so that range stays tight.
- **Idle rows write nowhere that matters.** A row whose slot is not decoding this step (free, or
  prefilled in this very step) feeds token 0 at position 0 and writes its keys/values into a spare
  "trash" slot past the scheduler's slots; its logits are dropped.
- **Keys are read up to a bucket** (the next multiple of `kv_step` above the longest row), masked per
  row at its own position, so short sequences do not pay for the cache's full length.

Positions and slots go to the device in one copy (pinned on CUDA) into static buffers. Tokens are read
from a per-slot buffer on the device (row r feeds slot r's last token) that the token choice writes
(`model.decoding.sampler`): a step can run before the host has seen the last step's tokens. Tokens chosen on the
host (beams, penalties, logprobs) are written there first. The graph writes its logits into a static
buffer, and the live rows' logits are gathered from it. All graphs share one memory pool:
they run one after another on one stream. On CPU (and with graphs off) the same fixed-shape step runs
eagerly, so the tests exercise everything but the capture itself; a capture that fails, or whose replay
disagrees with the eager step, turns graphs off with a logged error rather than serving wrong tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..arch.kv_cache import CrossCache, KVCache
from .device import copy_from_host, host_longs, to_device

log = logging.getLogger("blipserve.decode")

# One decode step at fixed shapes: (tokens [R], positions [R], write slots [R], cache, kv_len, dense)
# -> logits [R, vocab] fp32; the model's `decode`.
DecodeFn = Callable[..., torch.Tensor]

POSITIONS, WRITES, PICK = range(3)  # rows of the static input buffer


def row_buckets(num_slots: int) -> list[int]:
    """Powers of two below `num_slots`, then `num_slots` itself."""
    sizes, n = [], 1
    while n < num_slots:
        sizes.append(n)
        n *= 2
    return [*sizes, num_slots]


def checked_device(keys: torch.Tensor, num_slots: int, graphs: bool) -> torch.device:
    """The device of a cache whose keys are `keys` [layers, slots, ...], once checked to hold the trash
    slot (num_slots + 1 slots) and, for `graphs`, to be on CUDA."""
    if keys.shape[1] != num_slots + 1:
        raise ValueError(f"the cache must have num_slots + 1 = {num_slots + 1} slots, got {keys.shape[1]}")
    if graphs and keys.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {keys.device}")
    return keys.device


def kv_buckets(max_len: int, step: int) -> list[int]:
    """Multiples of `step` below `max_len`, then `max_len` itself."""
    if step < 1:
        raise ValueError(f"kv_step must be >= 1, got {step}")
    return [*range(step, max_len, step), max_len]


def _ceil(value: int, ladder: list[int]) -> int:
    for size in ladder:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {ladder[-1]}")


class StaticDecoder:
    """Runs decode steps over slots [0, rows) at bucketed shapes; with `graphs`, as CUDA graphs.

    `cache` must have one slot more than `num_slots`: slot `num_slots` is the trash slot idle rows write
    to. `tokens` [num_slots + 1] holds each slot's last token on the device (a buffer of its own if None).
    """

    def __init__(
        self,
        decode: DecodeFn,
        cache: KVCache | CrossCache,
        num_slots: int,
        kv_step: int,
        graphs: bool,
        tokens: torch.Tensor | None = None,
    ):
        device = checked_device((cache.own if isinstance(cache, CrossCache) else cache).k, num_slots, graphs)
        self.decode, self.cache, self.device = decode, cache, device
        self.num_slots = num_slots
        self.trash = num_slots
        self.rows_ladder = row_buckets(num_slots)
        self.kv_ladder = kv_buckets(cache.max_len, kv_step)
        if tokens is None:
            tokens = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
        if tokens.shape != (num_slots + 1,) or tokens.device != device:
            raise ValueError(f"tokens must be [num_slots + 1] = [{num_slots + 1}] on {device}, got "
                             f"{tuple(tokens.shape)} on {tokens.device}")  # fmt: skip
        self.tokens = tokens
        # [3, num_slots]: positions, write slots, and (first n entries) the live rows to pick.
        self.inputs = torch.zeros((3, num_slots), dtype=torch.long, device=device)
        self.every_slot = list(range(num_slots))
        self.graphs_on = graphs
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.logits: torch.Tensor | None = None  # [num_slots, vocab] fp32, the graphs' output buffer

    def bucket(self, highest_slot: int, longest: int) -> tuple[int, int]:
        """(rows, kv_len) of the step that covers slots up to `highest_slot` and `longest` positions."""
        return _ceil(highest_slot + 1, self.rows_ladder), _ceil(longest, self.kv_ladder)

    def step(self, rows: int, kv: int) -> torch.Tensor:
        """The fixed-shape step on the static inputs (what a graph captures): logits [rows, vocab]."""
        x = self.inputs
        return self.decode(
            self.tokens[:rows], x[POSITIONS, :rows], x[WRITES, :rows], self.cache, kv, dense=True
        )

    @torch.inference_mode()
    def run(
        self,
        positions: list[int],
        slots: list[int],
        host_slots: list[int] = (),
        host_tokens: list[int] = (),
    ) -> torch.Tensor:
        """Logits [len(slots), vocab] of one decode step: row i feeds slot `slots[i]`'s last token (from
        `tokens`, after `host_tokens` are written to `host_slots`) at `positions[i]`."""
        n = len(slots)
        if not n or len(positions) != n or len(host_slots) != len(host_tokens):
            raise ValueError(
                f"positions and slots need equal non-zero lengths, got {len(positions)}, {n}; host_slots "
                f"and host_tokens equal lengths, got {len(host_slots)}, {len(host_tokens)}"
            )
        rows, kv = self.bucket(max(slots), max(positions) + 1)
        graph = self._graph(rows, kv) if self.graphs_on else None
        if host_slots:
            pairs = to_device(host_longs([*host_slots, *host_tokens]), self.device).view(2, -1)
            self.tokens.index_copy_(0, pairs[0], pairs[1])
        in_order = self._load(rows, positions, slots)
        if graph is None:
            out = self.step(rows, kv)
        else:
            graph.replay()
            out = self.logits
        # Rows in slot order over every row of the bucket (a full batch): the logits as they are.
        return out[:n] if in_order else out[self.inputs[PICK, :n]]

    def picked_slots(self, n: int) -> torch.Tensor:
        """The slots of the last `run`'s `n` rows, in row order, on the device (its `slots`)."""
        return self.inputs[PICK, :n]

    def _load(self, rows: int, positions: list[int], slots: list[int]) -> bool:
        """Idle rows: position 0, written to the trash slot (whatever token their slot last had); live
        rows at their slots. Returns whether `slots` are exactly [0, rows) in order."""
        n = len(slots)
        in_order = n == rows and slots == self.every_slot[:n]
        if in_order:  # a full bucket in slot order: no scatter
            flat = [*positions, *slots, *slots]
        else:
            flat = [0] * (3 * rows)
            flat[rows : 2 * rows] = [self.trash] * rows
            for p, s in zip(positions, slots, strict=True):
                flat[s] = p
                flat[rows + s] = s
            flat[2 * rows : 2 * rows + n] = slots
        copy_from_host(self.inputs[:, :rows], host_longs(flat).view(3, rows))
        return in_order

    def _graph(self, rows: int, kv: int) -> torch.cuda.CUDAGraph | None:
        graph = self.graphs.get((rows, kv))
        if graph is None and self.graphs_on:
            try:
                graph = self._capture(rows, kv)
            except Exception:  # noqa: BLE001 - any capture failure must leave the eager step serving
                log.exception(
                    "CUDA graph capture failed at rows=%d kv=%d; decoding eagerly from now on", rows, kv
                )
                self.graphs_on = False
                return None
        return graph

    def _capture(self, rows: int, kv: int) -> torch.cuda.CUDAGraph | None:
        # Every row idle: the warm-up, the capture and the check write only to the trash slot.
        self.inputs[:, :rows] = torch.tensor([0, self.trash, 0], device=self.device)[:, None]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture stream: lazy inits, cuBLAS workspaces
            width = self.step(rows, kv).shape[-1]
        current.wait_stream(side)
        if self.logits is None:
            self.logits = torch.empty((self.num_slots, width), dtype=torch.float32, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:rows].copy_(self.step(rows, kv))
        graph.replay()
        if not torch.allclose(self.logits[:rows], self.step(rows, kv), rtol=1e-2, atol=1e-2):
            log.error(
                "CUDA graph replay differs from the eager step at rows=%d kv=%d; decoding eagerly", rows, kv
            )
            self.graphs_on = False
            return None
        self.graphs[(rows, kv)] = graph
        return graph

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket now (at warm-up, before traffic), largest first as the pool prefers;
        returns how many graphs are ready."""
        for rows in reversed(self.rows_ladder):
            for kv in reversed(self.kv_ladder):
                if self.graphs_on:
                    self._graph(rows, kv)
        return len(self.graphs)
