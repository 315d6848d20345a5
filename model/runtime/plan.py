"""The contract between a scheduler and the model runner: what one engine step must do.

A scheduler (e.g. `batching.Scheduler`) fills a `StepPlan` without touching tensor maths; the runner
(`model.runtime.runner.ModelRunner`) executes it and returns a `StepOutput`. Both are plain data: the
scheduler alone owns each sequence's state, appends the sampled tokens (`SequenceOutput`), decides when
a sequence finishes and frees its cache slots (vLLM v1's `update_from_output`, nano-vllm's `postprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding.generation import SamplerMode, TokenLogprob


@dataclass(frozen=True)
class SamplingSpec:
    """How a request's tokens are chosen, fixed for its life: plain settings for the runner's batched
    sampler (`model.decoding.sampler`)."""

    mode: SamplerMode
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    eos_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # the top alternatives to report per token (None: no logprobs)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    keep: int = 0  # BEAM: candidates kept per step (transformers: max(2, 1 + len(eos)) * num_beams)
    # Derived once (the sampler reads them every step): a logits processor reads each row's token
    # history (repetition penalty, no-repeat n-grams); `plain`: greedy with nothing but the argmax.
    reads_history: bool = field(init=False)
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        history = self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
        object.__setattr__(self, "reads_history", history)
        plain = self.mode is SamplerMode.GREEDY and not history and self.logprobs is None
        object.__setattr__(self, "plain", plain and not self.min_new_tokens)


@dataclass(slots=True)
class SequenceWork:
    """One request's rows in this step, as plain data: the scheduler owns the request's state.

    A one-row request's decode work is one object for its life, updated by the scheduler as it plans
    each step (host time per step): the runner reads `positions`, `tokens`, `generated` and `history`
    when it launches the step; `seq_id`, `slots`, `sampling`, `prompt_len` and `rows` never change."""

    # Scheduler-wide id of the request.
    seq_id: int
    # KV-cache slot of each row in this step. Prefill: every row (the first is prefilled, the others
    # copy it: n samples, beams); decode: the rows still running.
    slots: list[int]
    sampling: SamplingSpec
    # Tokens each row has generated before this step's (launched ones not read back yet included):
    # the sampling noise's step, and min_new_tokens.
    generated: int = 0
    # SAMPLE: each row's 32-bit noise key (`model.decoding.sampling.noise_key`), one per slot.
    keys: list[int] = field(default_factory=list)
    # Prefill only: content key of the image whose query embeddings open the prompt.
    image_key: str = ""
    # Prefill only: prompt token ids after the image placeholders (BOS first).
    text_ids: list[int] = field(default_factory=list)
    # Decode only: each row's cache position (where its input token goes).
    positions: list[int] = field(default_factory=list)
    # Decode only: each row's input token; None: its slot's last pick, still on the device.
    tokens: list[int | None] = field(default_factory=list)
    # BEAM, with a processor that reads it (`SamplingSpec.reads_history`): each beam's token history
    # (its prompt ids and tokens). GREEDY / SAMPLE rows' histories are on the device (the runner's
    # per-slot buffer: `prompt_ids` written at prefill, each chosen token appended by the sampler).
    history: list[list[int]] | None = None
    # Length of the request's token history before its first token (`len(prompt_ids)`): a row's
    # history before this step's token is `prompt_len + generated` long.
    prompt_len: int = 0
    # Prefill only, with a processor that reads the history: the token history the rows start from.
    prompt_ids: list[int] | None = None
    # BEAM: each beam's running score (sum of log-probabilities).
    beam_scores: list[float] | None = None
    # The scheduler's index of each row among the request's rows (the runner does not read it).
    rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SequenceOutput:
    """What the runner's sampler chose for one request this step (plain data)."""

    # GREEDY / SAMPLE: each row's new token, in the order of the work's slots.
    tokens: list[int] = field(default_factory=list)
    # With logprobs: each row's entry (BEAM: each candidate's).
    logprobs: list[TokenLogprob] | None = None
    # BEAM: the `keep` best (beam, token) candidates, best first: the beam (a row of the work) each
    # continues, its token, and its score (running score + processed log-probability). Empty otherwise
    # (immutable defaults: one output per sequence per step is built, so it must be cheap).
    parents: list[int] | tuple[()] = ()
    candidates: list[int] | tuple[()] = ()
    scores: list[float] | tuple[()] = ()


@dataclass
class CacheMoves:
    """Cache slot copies to make before a step (beam reorders: sources read before any write)."""

    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    upto: int = 0  # positions that hold keys/values in any moved slot


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
    # Beam reorders chosen by the last step, made before this one's decode.
    moves: CacheMoves | None = None

    def is_empty(self) -> bool:
        return not (self.encode or self.awaits_vision or self.runs_model)

    @property
    def chainable(self) -> bool:
        """Whether the next step may be planned and launched before this one's tokens are read back:
        every row here takes one token per step, chosen on the device, which the next step reads from
        there (its input token and, for the processors that read it, its token history). Beams (a
        cache reorder chosen on the host) need this step's tokens on the host first."""
        beam = SamplerMode.BEAM
        return all(w.sampling.mode is not beam for w in (*self.prefills, *self.decodes))

    @property
    def runs_model(self) -> bool:
        """Work for this step itself (else the runner waits for the background vision stage)."""
        return bool(self.prefills or self.decodes or self.retrievals or self.scorings)


@dataclass
class StepOutput:
    # What the sampler chose for each sequence (by seq_id) this step.
    sequences: dict[int, SequenceOutput] = field(default_factory=dict)
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
