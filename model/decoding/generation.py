"""Generation settings and the plain data of a request's outputs.

The batched sampler (`model.decoding.sampler`, `processors`, `sampling`) follows `transformers`'
`generate` (same processors, same order) so that greedy and beam search give identical tokens, and
log-probabilities equal the log-softmax of its `output_scores`.
"""

from __future__ import annotations

import numbers
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


class SamplingError(ValueError):
    """A sampling setting out of its rules: `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class Bound:
    """A setting's range (pydantic's names: ge, gt, le); None: no bound on that side."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def kwargs(self) -> dict[str, float]:
        """The bounds as `pydantic.Field` takes them (the HTTP schema's 422s name the field)."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def __str__(self) -> str:
        parts = [
            f">= {self.ge}" if self.ge is not None else "",
            f"> {self.gt}" if self.gt is not None else "",
        ]
        parts.append(f"<= {self.le}" if self.le is not None else "")
        return " and ".join(p for p in parts if p)


MAX_LOGPROBS = 5
# Largest no_repeat_ngram_size: longer n-grams hardly repeat (transformers' examples use 2 or 3), and
# the cost per step grows with it.
MAX_NO_REPEAT_NGRAM = 32

# Every sampling setting's range: the one source of the rules, for `SamplingParams` and the HTTP schema
# (`server.schemas.GenerationParams`). A server's own limits (max_new_tokens, num_beams, n) come on top.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_new_tokens": Bound(ge=1),
    "min_new_tokens": Bound(ge=0),
    "num_beams": Bound(ge=1),
    "length_penalty": Bound(ge=-10, le=10),
    "temperature": Bound(ge=MIN_DIVISOR, le=10),
    "top_k": Bound(ge=0, le=10_000),
    "top_p": Bound(gt=0, le=1),
    "repetition_penalty": Bound(ge=MIN_DIVISOR, le=10),
    "no_repeat_ngram_size": Bound(ge=0, le=MAX_NO_REPEAT_NGRAM),
    "seed": Bound(ge=0, le=2**63 - 1),
    "n": Bound(ge=1),
    "logprobs": Bound(ge=0, le=MAX_LOGPROBS),
}


# The settings that count or index (tokens, beams, outputs, a seed): ints, never bool or float. The
# others are floats, which may be given as ints.
INTEGER_SETTINGS = frozenset(
    (
        "max_new_tokens",
        "min_new_tokens",
        "num_beams",
        "top_k",
        "no_repeat_ngram_size",
        "seed",
        "n",
        "logprobs",
    )
)


# Stop strings per request and characters per stop string (the HTTP schema takes the same).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 100
# The settings whose None means something (no seed: a random one; no logprobs: off).
OPTIONAL_SETTINGS = frozenset(("seed", "logprobs"))


def _is_int(value: object) -> bool:
    """An integer (Python's or numpy's), not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings of one request; defaults are greedy decoding. SamplingError (a ValueError
    naming the field) for a setting out of `SAMPLING_BOUNDS` or settings that do not go together."""

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
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_SETTINGS:
                continue
            if name in INTEGER_SETTINGS and not _is_int(value):  # 3.5 fails in torch; True is no count
                raise SamplingError(name, f"must be an integer, got {value!r}")
            if not (_is_int(value) or isinstance(value, numbers.Real) and not isinstance(value, bool)):
                raise SamplingError(name, f"must be a number, got {value!r}")
            if not bound.holds(value):
                raise SamplingError(name, f"must be {bound}, got {value!r}")
        if not isinstance(self.do_sample, bool):
            raise SamplingError("do_sample", f"must be True or False, got {self.do_sample!r}")
        if not isinstance(self.stop, tuple | list) or len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(
                "stop", f"must be a list of up to {MAX_STOP_STRINGS} strings, got {self.stop!r}"
            )
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise SamplingError("stop", f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingError("min_new_tokens", f"must not exceed max_new_tokens ({self.max_new_tokens})")
        if self.do_sample and self.num_beams > 1:
            raise SamplingError("do_sample", "sampling with num_beams > 1 is not supported")
        if self.n > 1 and not self.do_sample and self.num_beams < self.n:
            raise SamplingError(
                "n",
                f"{self.n} outputs need do_sample or num_beams >= n (num_beams is {self.num_beams})",
            )

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
