"""What an engine checks of a request it is sent: only what protects the engine itself.

The HTTP process validates and tokenizes a request (`model.frontend.Frontend`, `model.processing`) and
the engine trusts its meaning (prompt rules, sampling rules, server limits). What the engine checks are
the sizes that would otherwise fail inside a step, or write where they must not, and so fail every
sequence batched with the request: the pixel frame's shape, the cache positions it needs against the
cache's length (and that they match its prompt and max_new_tokens), its rows against the KV slots, and
every token id against the vocabulary. Each failure is a ValueError naming the field (the engine
answers `Rejected("invalid")`, a 422).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .frontend import GenerationRequest
from .processing import InputProcessor, PromptInputs
from .runtime.plan import RetrievalRequest, ScoringRequest

Request = GenerationRequest | RetrievalRequest | ScoringRequest


@dataclass(frozen=True)
class RequestGuard:
    """An engine's sizes: the checkpoint's rules (`processor`), its image side (`height` x `width`),
    the cache positions per slot (`max_len`) and the KV slots (`num_slots`)."""

    processor: InputProcessor
    height: int
    width: int
    max_len: int
    num_slots: int

    def check(self, request: Request) -> Request:
        """`request` itself, or ValueError naming what does not fit this engine."""
        if isinstance(request, RetrievalRequest):
            self._retrieval(request)
        elif isinstance(request, ScoringRequest):
            self._scoring(request)
        else:
            self._generation(request)
        return request

    def pixels(self, pixels: torch.Tensor | None, required: bool) -> None:
        """float32 [3, H, W] (normalised) or uint8 [H, W, 3] (before normalising), at the model's side."""
        if pixels is None:
            if required:
                raise ValueError("pixel_values: this request needs an image")
            return
        h, w = self.height, self.width
        want = (h, w, 3) if pixels.dtype == torch.uint8 else (3, h, w)
        if tuple(pixels.shape) != want or pixels.dtype not in (torch.uint8, torch.float32):
            raise ValueError(
                f"pixel_values: {pixels.dtype} {tuple(pixels.shape)}; this model takes float32 [3, {h}, "
                f"{w}] or uint8 [{h}, {w}, 3]"
            )

    def token_ids(self, field: str, rows: Iterable[list[int]], vocab: int) -> None:
        """Every id of `rows` in [0, vocab)."""
        for i, row in enumerate(rows):
            if row and (min(row) < 0 or max(row) >= vocab):
                raise ValueError(f"{field}[{i}]: token ids must be in [0, {vocab})")

    def _generation(self, r: GenerationRequest) -> None:
        p = self.processor
        self.pixels(r.pixel_values, required=True)
        if not r.text_ids:
            raise ValueError("text_ids: empty")
        self.token_ids("text_ids", [r.text_ids, r.prompt_ids], p.vocab_size)
        rows = r.params.num_beams if r.params.num_beams > 1 else r.params.n
        if rows > self.num_slots:
            raise ValueError(
                f"the request needs {rows} rows (num_beams or n); this engine has {self.num_slots}"
            )
        inputs = PromptInputs(r.text_ids, r.prompt_ids, p.prompt_tokens(r.text_ids))
        needed = p.positions(inputs, r.params.max_new_tokens)
        if r.positions != needed:
            raise ValueError(
                f"positions: {r.positions}, but the prompt and max_new_tokens take {needed} (inconsistent)"
            )
        if needed > self.max_len:
            raise ValueError(f"request needs {needed} positions; this engine has {self.max_len}")

    def _scoring(self, r: ScoringRequest) -> None:
        p = self.processor
        self.pixels(r.pixel_values, required=True)
        if not r.candidates or not all(r.candidates):
            raise ValueError("candidates: a scoring request needs candidates of one token or more")
        self.token_ids("candidates", r.candidates, p.vocab_size)
        self.token_ids("text_ids", [r.text_ids], p.vocab_size)
        prefix, source = len(p.prompt_ids(r.text_ids)), p.prompt_tokens(r.text_ids)
        if (r.prefix_positions, r.source_positions) != (prefix, source):
            raise ValueError(
                f"prefix_positions, source_positions: ({r.prefix_positions}, {r.source_positions}), but "
                f"the prompt takes ({prefix}, {source}) (inconsistent)"
            )
        longest = max(prefix + max(len(c) for c in r.candidates), source)
        if longest > p.max_positions:
            raise ValueError(f"candidates: {longest} positions; the model has {p.max_positions}")

    def _retrieval(self, r: RetrievalRequest) -> None:
        p = self.processor
        if r.task not in ("match", "embed"):
            raise ValueError(f"task: 'match' or 'embed', got {r.task!r}")
        self.pixels(r.pixel_values, required=r.task == "match")
        if r.task == "match" and not r.texts:
            raise ValueError("texts: match needs at least one")
        if any(not t or len(t) > p.max_positions for t in r.texts):
            raise ValueError(f"texts: each of 1 to {p.max_positions} tokens")
        self.token_ids("texts", r.texts, p.vocab_size)
