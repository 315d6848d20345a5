"""The contract between a scheduler and the model runner: what one engine step must do.

A scheduler (e.g. `batching.Scheduler`) fills a `StepPlan` without touching tensor maths; the runner
(`model.runner.ModelRunner`) executes it and returns a `StepOutput`; the scheduler then reads each
sequence's `Step` to append tokens, finish requests and free cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decoders import Decoder
from .generation import Step


@dataclass
class SequenceWork:
    """One request's rows in this step."""

    # Scheduler-wide id of the request.
    seq_id: int
    # KV-cache slot of each row: one for greedy/sampling, n for n samples, `num_beams` for beam search.
    slots: list[int]
    # Token history and next-token choice (greedy, sampling or beams) of this request.
    decoder: Decoder
    # Prefill only: content key of the image whose query embeddings open the prompt.
    image_key: str = ""
    # Prefill only: prompt token ids after the image placeholders (BOS first).
    text_ids: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    # Images whose vision + Q-Former stage may be needed this step, by content key. The runner skips the
    # ones already in its embedding cache and runs the rest as one batch.
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sequences whose whole prompt runs this step (then they pick their first token).
    prefills: list[SequenceWork] = field(default_factory=list)
    # Running sequences that feed their last token and pick the next one.
    decodes: list[SequenceWork] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes)


@dataclass
class StepOutput:
    # What each sequence (by seq_id) did this step.
    steps: dict[int, Step] = field(default_factory=dict)
    # Images that went through the vision stage (cache misses) and cache hits, this step.
    vision_images: int = 0
    cache_hits: int = 0
    # Wall-clock seconds of each stage this step (0 when the stage did not run).
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # Rows in the decode batch this step.
    decode_rows: int = 0
