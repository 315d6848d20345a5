"""The logits processors that read a row's token history, batched over rows of unequal lengths.

`history_processors` applies transformers' `RepetitionPenaltyLogitsProcessor` and
`NoRepeatNGramLogitsProcessor` (`generation/logits_process.py`, same order, same arithmetic) to many
rows at once, each with its own history length, penalty and n-gram size: row r gives exactly what the
processors give on that row alone with its history `history[r, :lengths[r]]`. The histories live on the
device (the runner's per-slot buffer, `model.runtime.runner`), so a step that uses them reads nothing
from the host and can be launched before the last step's tokens are read back.
"""

from __future__ import annotations

import torch

from ..runtime.device import device_index, to_device


def history_processors(
    scores: torch.Tensor,
    history: torch.Tensor,
    lengths: list[int],
    penalties: list[float],
    sizes: list[int],
) -> torch.Tensor:
    """`scores` [R, vocab] float after each row's repetition penalty and no-repeat n-grams.

    `history` [R, W] int64 on the scores' device: row r's token history is its first `lengths[r]`
    entries (1 <= lengths[r] <= W; the rest is ignored). `penalties[r]`: its repetition penalty (1.0:
    none); `sizes[r]`: its no_repeat_ngram_size (0: none). Ids at or past the vocabulary are never
    penalised nor banned (transformers' spare column). Rows with the same penalty (or size) share one
    set of ops, with the penalty as a Python float, as transformers applies it (bit-exact)."""
    rows, vocab = scores.shape
    width = max(lengths)
    device = scores.device
    history = history[:, :width]
    lens = device_index(lengths, device)
    valid = torch.arange(width, device=device)[None, :] < lens[:, None]
    for penalty in sorted(set(penalties) - {1.0}):
        mask = _rows_mask([p == penalty for p in penalties], device) & valid
        seen = _scatter_mask(torch.where(mask, history.clamp(max=vocab), vocab), rows, vocab)
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalised, scores)
    for size in sorted(set(sizes) - {0}):
        if width < size:  # no row has a complete n-gram yet
            continue
        in_group = _rows_mask([s == size for s in sizes], device)
        scores = _ban_ngrams(scores, history, lens, size, in_group)
    return scores


def _rows_mask(flags: list[bool], device: torch.device) -> torch.Tensor:
    """[R, 1] bool: which rows a group of ops acts on."""
    return to_device(torch.tensor(flags), device)[:, None]


def _scatter_mask(ids: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] bool, True at each row's `ids` (id `vocab`: the spare column, dropped)."""
    mask = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab]


def _ban_ngrams(
    scores: torch.Tensor, history: torch.Tensor, lens: torch.Tensor, size: int, in_group: torch.Tensor
) -> torch.Tensor:
    """transformers' vectorised `NoRepeatNGramLogitsProcessor` per row of its own length: the row's
    last size - 1 tokens are matched against each of its complete windows (starting at j with
    j + size <= length), and each matching window bans its own last token."""
    rows, vocab = scores.shape
    windows = history.unfold(1, size, 1)  # [R, W - size + 1, size]
    starts = torch.arange(windows.shape[1], device=scores.device)
    complete = (starts[None, :] <= (lens - size)[:, None]) & in_group
    at = (lens[:, None] - size + 1 + torch.arange(size - 1, device=scores.device)).clamp(min=0)
    prefix = history.gather(1, at)  # [R, size - 1]
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1) & complete
    banned = _scatter_mask(torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), rows, vocab)
    return scores.masked_fill(banned, -float("inf"))
