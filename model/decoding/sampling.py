"""Sampling many rows at once on the device, each reproducible from its own seed.

A token is drawn by the Gumbel-max trick: `argmax(scores + g)` with g ~ Gumbel(0, 1) per vocabulary entry
samples exactly from `softmax(scores)`, and entries at -inf (ruled out by top-k / top-p) are never drawn.
The noise is not drawn from a generator but computed: a counter-based hash of (row key, step, token id).
So a row's tokens depend only on its seed and its position, never on which other rows share the batch, and
a whole batch of rows is one fused computation with no per-row generator, no host copy of probabilities
and no device->host sync but the final token read.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from ..runtime.device import device_index, to_device

M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (Wellons' "lowbias32"), on Python ints or int64 tensors holding 32-bit values.
    Products may pass 2**63 in int64: they wrap, and only their low 32 bits are kept, as in uint32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def noise_key(seed: int | None, offset: int = 0) -> int:
    """The 32-bit key of one sampled row: the i-th of n samples (`offset` i) draws as a request with seed
    `seed + i` would; random when the request gave no seed."""
    if seed is None:
        return secrets.randbits(32)
    seed += offset
    return mix32((seed & M32) ^ mix32((seed >> 32) & M32))


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 Gumbel(0, 1) noise, a pure function of each row's key and step."""
    ids = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    row = mix32(keys[:, None] ^ mix32((steps[:, None] + 0x9E3779B9) & M32))
    bits = mix32(ids[None, :] ^ row)
    # The top 24 bits, centred: u lies strictly inside (0, 1) and is exact in float32.
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
    return -torch.log(-torch.log(u))


def sample(scores: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of already processed and warped `scores` [R, vocab]; stays on the device."""
    return (scores.float() + gumbel_noise(keys, steps, scores.shape[-1])).argmax(-1)


def warp_rows(
    logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (in that order)
    with each row's own temperature, top-k and top-p, in one pass (equal to them row by row). The
    per-row settings go up without a host wait (`model.runtime.device`), so a step launched ahead of
    the last one's tokens stays ahead."""
    device = logits.device
    if any(t != 1.0 for t in temperature):
        logits = logits / to_device(torch.tensor(temperature, dtype=logits.dtype), device)[:, None]
    kmax = min(max(top_k), logits.shape[-1])
    if kmax:
        k = device_index([min(k, kmax) for k in top_k], device)
        kth = torch.topk(logits, kmax)[0].gather(1, (k - 1).clamp(min=0)[:, None])
        remove = (logits < kth) & (k > 0)[:, None]
        logits = logits.masked_fill(remove, -float("inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        limit = to_device(torch.tensor([1 - p for p in top_p], dtype=cumulative.dtype), device)
        remove = cumulative <= limit[:, None]
        remove[..., -1:] = False
        remove &= to_device(torch.tensor([p < 1.0 for p in top_p]), device)[:, None]
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits
