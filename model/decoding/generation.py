"""Generation settings and the plain data of a request's outputs.

The batched sampler (`model.decoding.sampler`, `processors`, `sampling`) follows `transformers`'
`generate` (same processors, same order) so that greedy and beam search give identical tokens, and
log-probabilities equal the log-softmax of its `output_scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

# Smallest temperature and repetition penalty: logits are divided by them, and below this an fp32 logit
# overflows to inf (sampling then fails, log-probabilities turn NaN).
MIN_DIVISOR = 1e-6


class FinishReason(StrEnum):
    """Why a sequence ended; the values are the protocol's / OpenAI's text."""

    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"
    ENGINE_DIED = "engine_died"


class SamplerMode(StrEnum):
    """How the batched sampler (`model.decoding.sampler`) picks a sequence's next token(s)."""

    GREEDY = "greedy"  # each row's argmax (after the logits processors)
    SAMPLE = "sample"  # each row's seeded draw (after the processors and the warpers)
    BEAM = "beam"  # the request's best (beam, token) candidates, for its `BeamSearch`


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings of one request; defaults are greedy decoding."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Outputs per request: the n best beams (num_beams >= n) or n samples, sharing one prefill.
    n: int = 1
    # Per generated token: its log-probability and the `logprobs` most likely alternatives (None: off).
    logprobs: int | None = None
    # Generation ends when the text contains one of these; the text is cut before it.
    stop: tuple[str, ...] = ()
    # No n-gram of this many tokens occurs twice in the decoder's token history (0: off), as
    # transformers' `no_repeat_ngram_size`: the history holds the prompt for decoder-only models.
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
            "num_beams": self.num_beams >= 1,
            "temperature": self.temperature >= MIN_DIVISOR,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty >= MIN_DIVISOR,
            "n": self.n >= 1,
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "stop": all(isinstance(s, str) and s for s in self.stop),
            "no_repeat_ngram_size": 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported")
        if self.n > 1 and not self.do_sample and self.num_beams < self.n:
            raise ValueError(f"n={self.n} needs sampling (do_sample) or num_beams >= n")

    @property
    def mode(self) -> SamplerMode:
        """Which of the sampler's modes chooses this request's tokens."""
        if self.num_beams > 1:
            return SamplerMode.BEAM
        return SamplerMode.SAMPLE if self.do_sample else SamplerMode.GREEDY

    @property
    def reads_history(self) -> bool:
        """A logits processor reads the row's token history (repetition penalty, no-repeat n-grams)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no logits processing: the row's argmax is its token (batched fast path)."""
        return (
            not self.do_sample
            and self.num_beams == 1
            and self.n == 1
            and not self.reads_history
            and self.logprobs is None
        )


MAX_LOGPROBS = 5
# Largest no_repeat_ngram_size: longer n-grams hardly repeat (transformers' examples use 2 or 3), and
# the cost per step grows with it.
MAX_NO_REPEAT_NGRAM = 32


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    # (token id, log-probability), most likely first; tokens the processors ruled out (-inf: top_k,
    # top_p, min_new_tokens) are no alternatives, so there may be fewer than asked.
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenOutput:
    """One output sequence of a request (several with n > 1)."""

    tokens: list[int]
    finish_reason: FinishReason | None  # stop | length; None while still running
    logprobs: list[TokenLogprob] | None = None  # one per token when requested


StopCheck = Callable[[list[int]], bool]  # True once the tokens' text holds a stop string
