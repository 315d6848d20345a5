"""The contract between a scheduler and the model runner: what one engine step must do.

A scheduler (e.g. `batching.Scheduler`) fills a `StepPlan` without touching tensor maths; the runner
(`model.runtime.runner.ModelRunner`) executes it and returns a `StepOutput`; the scheduler then reads each
sequence's `Step` to append tokens, finish requests and free cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding.decoders import ON_DEVICE, Decoder
from ..decoding.generation import Step


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
class RetrievalRequest:
    """A matching or embedding request, ready for the scheduler: it takes no cache slot and is done in
    the step that admits it."""

    task: str  # "match": ITM and ITC scores of each text against the image; "embed": embeddings
    # [3, H, W] float32 on the CPU, or [H, W, 3] uint8 before normalising; None: texts only (embed).
    pixel_values: torch.Tensor | None
    image_key: str  # content hash of pixel_values ("" without an image)
    texts: list[list[int]]  # token ids of each text


@dataclass
class RetrievalWork:
    # Scheduler-wide id of the request.
    seq_id: int
    # "match" or "embed".
    task: str
    # Content key of the image whose features the request needs ("" for none).
    image_key: str
    # Token ids of each text.
    texts: list[list[int]]


@dataclass
class RetrievalOutput:
    # match: probability that each text matches the image (ITM head, softmax of its "yes" logit).
    itm: list[float] = field(default_factory=list)
    # match: contrastive similarity of each text with the image (cosine; BLIP-2: the best query).
    itc: list[float] = field(default_factory=list)
    # embed: the image's normalised embeddings, one per query (BLIP-2: 32; BLIP: 1).
    image_embedding: list[list[float]] = field(default_factory=list)
    # embed: each text's normalised embedding.
    text_embeddings: list[list[float]] = field(default_factory=list)


@dataclass
class ScoringRequest:
    """Candidate answers to score given an image and a prompt (`model.runtime.scoring`): nothing is
    generated; it takes no cache slot and is done in the step that admits it."""

    # [3, H, W] float32 on the CPU, or [H, W, 3] uint8 before normalising.
    pixel_values: torch.Tensor
    image_key: str  # content hash of pixel_values
    text_ids: list[int]  # prompt ids after the image placeholders, as for generation
    candidates: list[list[int]]  # token ids of each candidate (`InputProcessor.candidate_ids`), none empty
    # Positions of the prompt in the decoder (len(prompt_ids): where the candidates start) and in the
    # text model's input (image queries + prompt: the cache the prefill fills), `model.processing`.
    prefix_positions: int
    source_positions: int
    priority: int = 0  # admission order among waiting requests: higher first (`batching.scheduler`)


@dataclass
class ScoringWork:
    # Scheduler-wide id of the request.
    seq_id: int
    # Content key of the image whose embeddings open the prompt.
    image_key: str
    # Prompt ids after the image placeholders.
    text_ids: list[int]
    # Token ids of each candidate.
    candidates: list[list[int]]
    # Decoder positions of the prompt, and positions of the text model's input (`ScoringRequest`).
    prefix_positions: int
    source_positions: int


@dataclass
class ScoringOutput:
    # Per candidate, in request order: each of its tokens' log-probability (natural log, fp32 log-softmax
    # of the model's logits) given the image, the prompt and the candidate's earlier tokens.
    logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class StepPlan:
    # Images whose vision + Q-Former stage may be needed this step, by content key: those of `encode`,
    # and those of the prefills and retrievals (the runner encodes any of these it holds no embeddings
    # for, in the step, as one batch).
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    # Images to put through the vision stage in the background (a worker thread; on CUDA a stream of
    # its own), while this and the next steps decode: their requests prefill once `encoded` says so.
    encode: list[str] = field(default_factory=list)
    # Sequences whose whole prompt runs this step (then they pick their first token).
    prefills: list[SequenceWork] = field(default_factory=list)
    # Running sequences that feed their last token and pick the next one.
    decodes: list[SequenceWork] = field(default_factory=list)
    # Matching / embedding requests, answered in full this step (after the vision stage).
    retrievals: list[RetrievalWork] = field(default_factory=list)
    # Candidate-scoring requests, answered in full this step (after the vision stage).
    scorings: list[ScoringWork] = field(default_factory=list)
    # Requests wait for a background vision batch: with nothing else to do, the runner waits for it.
    awaits_vision: bool = False

    def is_empty(self) -> bool:
        return not (self.encode or self.awaits_vision or self.runs_model)

    @property
    def chainable(self) -> bool:
        """Whether the next step may be planned and launched before this one's tokens are read back:
        every sequence here takes one token per step, chosen on the device (plain greedy or plain
        sampling, one row), which the next step reads from there. Beams (a cache reorder), n samples,
        penalties and logprobs need this step's tokens on the host first."""
        return all(
            w.decoder.batched in ON_DEVICE and w.decoder.num_rows == 1
            for w in (*self.prefills, *self.decodes)
        )

    @property
    def runs_model(self) -> bool:
        """Work for this step itself (else the runner waits for the background vision stage)."""
        return bool(self.prefills or self.decodes or self.retrievals or self.scorings)


@dataclass
class StepOutput:
    # What each sequence (by seq_id) did this step.
    steps: dict[int, Step] = field(default_factory=dict)
    # Background vision batches that finished by this step: their images' keys, and the keys whose
    # batch failed (with why); those requests fail.
    encoded: list[str] = field(default_factory=list)
    vision_errors: dict[str, str] = field(default_factory=dict)
    # Images that went through the vision stage (cache misses) and cache hits, this step.
    vision_images: int = 0
    # Whether some of them were encoded inside the step (prefills and retrievals whose embeddings the
    # runner did not hold), not in the background.
    vision_in_step: bool = False
    cache_hits: int = 0
    # Wall-clock seconds of each stage this step (0 when the stage did not run).
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # Rows in the decode batch this step.
    decode_rows: int = 0
    # What each retrieval request (by seq_id) returns.
    retrievals: dict[int, RetrievalOutput] = field(default_factory=dict)
    # What each scoring request (by seq_id) returns.
    scorings: dict[int, ScoringOutput] = field(default_factory=dict)
