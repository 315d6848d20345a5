"""Generation settings and the logits arithmetic shared by every decoder (see `model.decoding.decoders`).

The arithmetic follows `transformers`' `generate` (same processors, same order) so that greedy and beam
search give identical tokens, and log-probabilities equal the log-softmax of its `output_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest temperature and repetition penalty: logits are divided by them, and below this an fp32 logit
# overflows to inf (sampling then fails, log-probabilities turn NaN).
MIN_DIVISOR = 1e-6


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
    def reads_history(self) -> bool:
        """A logits processor reads the row's token history (repetition penalty, no-repeat n-grams):
        the row's token is chosen on the host, not in a batched choice on the device."""
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
    finish_reason: str | None  # stop | length; None while still running
    logprobs: list[TokenLogprob] | None = None  # one per token when requested


def token_logprobs(log_probs: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """For each row of `log_probs` [rows, vocab]: the chosen token's entry and the top k (one host copy)."""
    chosen = log_probs.gather(1, torch.tensor(tokens, device=log_probs.device)[:, None])[:, 0].tolist()
    top_lp, top_id = torch.topk(log_probs, k) if k else (log_probs[:, :0], log_probs[:, :0].long())
    return [
        TokenLogprob(t, lp, tuple((i, p) for i, p in zip(ids, lps, strict=True) if p != float("-inf")))
        for t, lp, ids, lps in zip(tokens, chosen, top_id.tolist(), top_lp.tolist(), strict=True)
    ]


@dataclass
class Step:
    """What one decode step did to a request's rows."""

    # For each row that runs in the next step, the index of the row it continues (always i for one row).
    parents: list[int]
    # The token each continuing row appends (and feeds to the next step).
    tokens: list[int]
    # True once the request is complete; its rows leave the batch.
    done: bool


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, size: int) -> torch.Tensor:
    """`scores` [rows, vocab] with -inf at each token that would complete an n-gram of `size` tokens
    already in its row of `history` [rows, length] (token ids). A port of transformers'
    vectorised `NoRepeatNGramLogitsProcessor`: the last size - 1 tokens are matched against every
    window of the history, and each matching window bans its own last token."""
    length, vocab = history.shape[-1], scores.shape[-1]
    if length < size:
        return scores  # no complete n-gram yet
    prefix = history[:, length + 1 - size :]
    windows = history.unfold(1, size, 1)  # [rows, length - size + 1, size]
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1)
    # Windows that do not match ban a spare column past the vocabulary.
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def process_logits(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, generated: int, eos: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty, no-repeat n-grams and min_new_tokens, as `transformers`' processors (same
    order). `history` [rows, length]: each row's token history (prompt_ids + generated)."""
    if params.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.no_repeat_ngram_size:
        logits = ban_repeated_ngrams(logits, history, params.no_repeat_ngram_size)
    if generated < params.min_new_tokens:
        logits = logits.clone()
        logits[:, eos] = -float("inf")
    return logits


def warp_for_sampling(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (in that order, as `transformers`)."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits
