"""What the runner needs of a model family: a typed contract instead of `hasattr` / `isinstance` checks.

Every model class states its `capabilities` (a class attribute); the runner (`model.runtime.runner`),
the scoring pass (`model.runtime.scoring`) and the fixed-shape paths (`model.runtime.static_*`) reach
the model only through these protocols:

- `GenerationModel` (BLIP-2 with OPT or Flan-T5, BLIP captioning and VQA): the vision stage (pixels ->
  query embeddings or image features), prefill, one decode step, a new KV cache, and the logits of
  teacher-forced rows over a cached prefix (candidate scoring).
- `StaticPrefillModel` (BLIP-2 with OPT): a prefill at fixed shapes that a CUDA graph can capture.
- `RetrievalModel` (BLIP-2 and BLIP image-text retrieval): the vision stage, image and text embeddings,
  and image-text matching logits; no cache.

The decode attention backend ("sdpa", or OPT's Triton kernels: "triton") is an argument of the model's
constructor, chosen by the loader before the model is built (`model.checkpoint.loader.load_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .kv_cache import AttnBatch


@dataclass(frozen=True)
class Capabilities:
    """What a model family can do, read by the runner instead of probing the model."""

    generates: bool = False  # prefill + decode with a KV cache (and candidate scoring)
    retrieves: bool = False  # image-text matching and embeddings, no cache
    static_prefill: bool = False  # `StaticPrefillModel.prefill_static` (CUDA-graph prefill)
    decode_kernels: bool = False  # a Triton decode attention backend exists (OPT)


class VisionStage(Protocol):
    capabilities: Capabilities
    cfg: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def lm_dtype(self) -> torch.dtype: ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> what the text side reads of each image [B, tokens, hidden]."""
        ...


class GenerationModel(VisionStage, Protocol):
    def new_cache(self, num_slots: int, max_len: int) -> Any:
        """The decoder's cache for `num_slots` sequences of up to `max_len` positions."""
        ...

    def prompt_inputs(self, image: torch.Tensor, text_ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """One request's prefill input (its image's embeddings, checked, and its text ids)."""
        ...

    def prefill(
        self, inputs: Sequence[tuple[torch.Tensor, list[int]]], slots: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Run whole prompts into `slots`; next-token logits [n, vocab] (fp32)."""
        ...

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: Any,
        kv_len: int,
        dense: bool = False,
    ) -> torch.Tensor:
        """One new token per row at its own position; next-token logits [B, vocab] (fp32)."""
        ...

    def rows_logits(self, tokens: torch.Tensor, batch: AttnBatch, cache: Any) -> torch.Tensor:
        """Logits [N, T, vocab] (fp32) of token rows [N, T] fed at `batch`'s positions over `cache`
        (no cache write of their own: candidate scoring, `model.runtime.scoring`)."""
        ...


class StaticPrefillModel(GenerationModel, Protocol):
    def prefill_static(
        self,
        ids: torch.Tensor,
        queries: torch.Tensor,
        last: torch.Tensor,
        slots: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """`prefill` at fixed shapes with every input on the device (`model.runtime.static_prefill`)."""
        ...


class RetrievalModel(VisionStage, Protocol):
    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor: ...

    def text_embeddings(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor: ...

    def match_logits(
        self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor: ...


DECODE_ATTENTION = ("sdpa", "triton")
