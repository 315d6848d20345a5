"""A static, slot-based KV cache and the per-step attention metadata that goes with it.

The cache is allocated once: `num_slots` rows of `max_len` positions for every layer. A running sequence
owns one slot (a beam-search request owns one per beam) and writes its keys/values at its own positions,
so sequences of different lengths share one decode batch without padding each other ("ragged"
positions). Nothing here is global: the cache object is passed explicitly to every forward call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.device import device_index, to_device


@dataclass
class AttnBatch:
    """Where the rows of one forward call live in the cache."""

    # [B] cache slot of each row.
    slots: torch.Tensor
    # [B, T] absolute position of each input token (0 = first prompt token); also the write index.
    positions: torch.Tensor
    # True: rows are whole prompts starting at position 0 (right-padded to T), attended causally.
    # False: one new token per row, attending to the cache up to its own position.
    is_prefill: bool
    # Decode only: keys are read up to this many positions (max over rows of position + 1).
    kv_len: int = 0
    # Decode only: [B, 1, 1, kv_len] True where a row may attend (position <= its own position).
    mask: torch.Tensor | None = None
    # Decode only: row r reads cache slot r in place (a view, not a gather), as the fixed-shape decode
    # step does (`model.runtime.static_decode`); `slots` then only says where each row writes.
    dense: bool = False
    # Dense decode only: the decode step's Triton kernels: attention (`model.kernels.decode_attention`),
    # each row up to its own position, instead of masked SDPA over the bucket; residual add + layer norm.
    kernel: bool = False

    @classmethod
    def prefill(cls, slots: torch.Tensor, length: int) -> AttnBatch:
        positions = torch.arange(length, device=slots.device).expand(slots.shape[0], length)
        return cls(slots=slots, positions=positions, is_prefill=True)

    @classmethod
    def decode(
        cls,
        slots: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
        dense: bool = False,
        kernel: bool = False,
    ) -> AttnBatch:
        """`positions` [B]: the position each row's new token takes; `kv_len` > max(positions)."""
        if positions.dim() != 1 or positions.shape[0] != slots.shape[0]:
            raise ValueError(f"positions must be [batch]={slots.shape[0]}, got {tuple(positions.shape)}")
        kernel = kernel and dense
        keys = torch.arange(kv_len, device=slots.device)
        mask = None if kernel else (keys[None, :] <= positions[:, None])[:, None, None, :]
        return cls(slots, positions[:, None], False, kv_len=kv_len, mask=mask, dense=dense, kernel=kernel)


class KVCache:
    """k, v: [layers, slots, heads, max_len, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, num_slots, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, batch: AttnBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, H, T, D] at `batch.positions` of `batch.slots`."""
        rows = batch.slots[:, None]
        # Advanced indices around a slice put the indexed dims first: the target view is [B, T, H, D].
        self.k[layer][rows, :, batch.positions] = k.transpose(1, 2)
        self.v[layer][rows, :, batch.positions] = v.transpose(1, 2)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def read(self, layer: int, batch: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, kv_len, D] of the batch's slots."""
        if batch.dense:
            rows = batch.slots.shape[0]
            return self.k[layer, :rows, :, : batch.kv_len], self.v[layer, :rows, :, : batch.kv_len]
        return (
            self.k[layer, batch.slots, :, : batch.kv_len],
            self.v[layer, batch.slots, :, : batch.kv_len],
        )

    def copy_slots(self, src: list[int], dst: list[int], upto: int | None = None) -> None:
        """Make slot dst[i] a copy of slot src[i] (its first `upto` positions, or all); sources are read
        before writing, so the moves may permute slots."""
        if len(src) != len(dst):
            raise ValueError(f"copy_slots needs equal lengths, got {len(src)} and {len(dst)}")
        moves = [(s, d) for s, d in zip(src, dst, strict=True) if s != d]
        if not moves:
            return
        index = to_device(torch.tensor(moves, dtype=torch.long), self.k.device).T
        s, d, n = index[0], index[1], self.max_len if upto is None else upto
        self.k[:, d, :, :n] = self.k[:, s, :, :n]
        self.v[:, d, :, :n] = self.v[:, s, :, :n]

    def reorder(self, src: list[int], dst: list[int], upto: int) -> None:
        """Beam search: beams change places; only their first `upto` positions hold anything yet."""
        self.copy_slots(src, dst, upto)


@dataclass
class CrossCache:
    """The cache of a decoder that cross-attends to a source (an encoder's output, or image features):
    per slot, the decoder's own keys/values and the source's cross-attention keys/values, projected
    once per sequence at prefill rather than at every step."""

    own: KVCache  # [layers, slots, heads, max_len, head_dim]
    cross: KVCache  # [layers, slots, heads, max_source, head_dim]
    lengths: torch.Tensor  # [slots] source length of each slot

    @classmethod
    def empty(
        cls,
        num_layers: int,
        num_slots: int,
        num_heads: int,
        max_len: int,
        max_source: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> CrossCache:
        own = KVCache(num_layers, num_slots, num_heads, max_len, head_dim, dtype, device)
        cross = KVCache(num_layers, num_slots, num_heads, max_source, head_dim, dtype, device)
        return cls(own, cross, torch.zeros(num_slots, dtype=torch.long, device=device))

    def reorder(self, src: list[int], dst: list[int], upto: int) -> None:
        """Beams change places: only their own keys/values move. The source (and its cross-attention
        keys/values) is the same for every beam of a request, and beams only trade places within one."""
        self.own.copy_slots(src, dst, upto)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        self.own.copy_slots(src, dst)
        self.cross.copy_slots(src, dst)
        if src:
            idx = device_index(src, self.lengths.device)
            self.lengths[device_index(dst, self.lengths.device)] = self.lengths[idx]

    @property
    def max_len(self) -> int:
        return self.own.max_len

    def cross_batch(self, slots: torch.Tensor, dense: bool = False) -> tuple[AttnBatch, torch.Tensor]:
        """Reading the whole source row of each slot (a fixed shape: no host sync for the longest),
        and the [B, 1, 1, max_source] mask of each row's real source positions. Dense rows read slots
        [0, B) in place; a row over a slot with no source (free) still sees one position, not none, so
        that its (discarded) output stays finite."""
        max_source = self.cross.max_len
        src = torch.arange(max_source, device=slots.device)
        lengths = self.lengths[: slots.shape[0]] if dense else self.lengths[slots]
        mask = (src[None, :] < lengths.clamp(min=1)[:, None])[:, None, None, :]
        batch = AttnBatch(slots, slots[:, None], is_prefill=False, kv_len=max_source, dense=dense)
        return batch, mask
