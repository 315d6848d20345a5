"""Per-request decoding state: which rows run, which token each appends, when the request is done.

Each request owns one decoder: a `TokenDecoder` (greedy or sampling, one row), a `ParallelDecoder`
(n samples, one row each, sharing the request's prefill) or a `BeamDecoder` (`num_beams` rows). The
runner asks `feed()` for the rows to run in a decode step, and hands the logits of the `active()` rows to
`step(logits)`, which returns a `Step`. `outputs()` are the results so far (final once done).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .beam import BeamDecoder
from .generation import (
    SamplingParams,
    Step,
    TokenLogprob,
    TokenOutput,
    process_logits,
    token_logprobs,
    warp_for_sampling,
)
from .sampling import noise_key, sample

# The batched choices whose tokens `choice.pick` writes to the runner's per-slot buffer on the device:
# a next decode step reads them there, without the host.
ON_DEVICE = ("argmax", "sample")


@dataclass(frozen=True)
class SampleRow:
    """What the runner's batched sampler needs of one row."""

    temperature: float
    top_k: int
    top_p: float
    key: int  # the row's 32-bit noise key (`sampling.noise_key`)
    step: int  # tokens generated so far: the noise differs at every position


@dataclass
class TokenDecoder:
    """Greedy or sampled decoding of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    eos_ids: tuple[int, ...]
    seed_offset: int = 0  # the i-th of n samples draws as a request with seed + i
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # Tokens picked on the device and not read back yet (0 or 1): the runner may launch the next step
    # before reading the last one's tokens (`model.runtime.plan.StepPlan.chainable`); that step feeds this
    # row's token from the device and counts it in its position.
    pending: int = 0

    def __post_init__(self) -> None:
        p = self.params
        # Which of the runner's batched token choices serves this row (`model.decoding.choice`), fixed per
        # request: the argmax (plain greedy), the seeded draw (sampling with no processor that reads
        # the history and no logprobs), or none (it steps on its own row).
        plain = not p.reads_history and p.logprobs is None
        self.batched = "argmax" if p.is_plain_greedy else "sample" if p.do_sample and plain else None
        self.noise_key = noise_key(p.seed, self.seed_offset) if p.do_sample else 0

    @property
    def num_rows(self) -> int:
        return 1

    def active(self) -> list[int]:
        """Rows (indices into the request's slots) that take part in the next step."""
        return [] if self.finish_reason else [0]

    def feed(self) -> list[tuple[int, int | None, int]]:
        """(row, token, position) of each row for the next decode step; token None: still on the device."""
        made = len(self.tokens) + self.pending
        if not made or self.finish_reason or made >= self.params.max_new_tokens:
            return []
        return [(0, None if self.pending else self.tokens[-1], len(self.prompt_ids) + made - 1)]

    def exhausted(self) -> bool:
        """The tokens launched so far reach max_new_tokens: no further step, whatever they turn out to be."""
        return len(self.tokens) + self.pending >= self.params.max_new_tokens

    def length(self) -> int:
        """Tokens in the sequence so far: placeholders, prompt and generated."""
        return len(self.prompt_ids) + len(self.tokens)

    def blocks_eos(self) -> bool:
        """min_new_tokens not reached yet: the stop tokens are ruled out of this step."""
        return len(self.tokens) + self.pending < self.params.min_new_tokens

    def sample_rows(self) -> list[SampleRow]:
        p = self.params
        return [SampleRow(p.temperature, p.top_k, p.top_p, self.noise_key, len(self.tokens) + self.pending)]

    def append_sampled(self, tokens: list[int]) -> Step:
        return self.append(tokens[0])

    def step(self, logits: torch.Tensor) -> Step:
        device = logits.device
        history = torch.tensor([self.prompt_ids + self.tokens], device=device)
        eos = torch.tensor(self.eos_ids, device=device)
        scores = process_logits(logits.float(), history, self.params, len(self.tokens), eos)
        if self.params.do_sample:
            scores = warp_for_sampling(scores, self.params)
            key = torch.tensor([self.noise_key], device=device)
            token = int(sample(scores, key, torch.tensor([len(self.tokens)], device=device))[0])
        else:
            token = int(scores.argmax(-1)[0])
        if self.params.logprobs is not None:
            # As transformers' output_scores: log-softmax of the processed (and warped) logits.
            self.logprobs += token_logprobs(scores.log_softmax(-1), [token], self.params.logprobs)
        return self.append(token)

    def discard_if_done(self) -> bool:
        """True (and the pending token forgotten) if the sequence had ended before this step's token:
        a step launched before the last one's tokens were read ran it once more (`StepPlan.chainable`)."""
        if self.finish_reason is None:
            return False
        self.pending = max(0, self.pending - 1)
        return True

    def append(self, token: int) -> Step:
        if self.pending:
            self.pending -= 1
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        done = self.finish_reason is not None
        return Step(parents=[] if done else [0], tokens=[] if done else [token], done=done)

    def outputs(self) -> list[TokenOutput]:
        lps = list(self.logprobs) if self.params.logprobs is not None else None
        return [TokenOutput(list(self.tokens), self.finish_reason, lps)]


class ParallelDecoder:
    """n independent samples of one request. They share its prefill (slot 0 is copied to the others)
    and each leaves the decode batch when it finishes; the request is done when all are."""

    def __init__(self, subs: list[TokenDecoder]):
        self.subs = subs
        self.params = subs[0].params
        self.eos_ids = subs[0].eos_ids
        self.batched = subs[0].batched  # "sample" or None: n > 1 is never greedy
        self.finish_reason: str | None = None

    @property
    def num_rows(self) -> int:
        return len(self.subs)

    def blocks_eos(self) -> bool:
        return any(self.subs[i].blocks_eos() for i in self.active())

    def sample_rows(self) -> list[SampleRow]:
        return [row for i in self.active() for row in self.subs[i].sample_rows()]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.subs) if not s.finish_reason]

    def feed(self) -> list[tuple[int, int | None, int]]:
        return [(i, tok, pos) for i, s in enumerate(self.subs) for _, tok, pos in s.feed()]

    def exhausted(self) -> bool:
        return False  # never stepped ahead of its tokens (see `StepPlan.chainable`)

    def step(self, logits: torch.Tensor) -> Step:
        for j, i in enumerate(self.active()):
            self.subs[i].step(logits[j : j + 1])
        return self._after_step()

    def discard_if_done(self) -> bool:
        return False  # never stepped ahead of its tokens (see `StepPlan.chainable`)

    def append_sampled(self, tokens: list[int]) -> Step:
        for token, i in zip(tokens, self.active(), strict=True):
            self.subs[i].append(token)
        return self._after_step()

    def _after_step(self) -> Step:
        left = self.active()
        if not left:
            reasons = {s.finish_reason for s in self.subs}
            self.finish_reason = "length" if "length" in reasons else "stop"
        return Step(parents=left, tokens=[self.subs[i].tokens[-1] for i in left], done=not left)

    def outputs(self) -> list[TokenOutput]:
        return [s.outputs()[0] for s in self.subs]


Decoder = TokenDecoder | ParallelDecoder | BeamDecoder


def new_decoder(
    params: SamplingParams,
    prompt_ids: list[int],
    eos_ids: tuple[int, ...],
) -> Decoder:
    """The decoder for a request's settings (stop strings are the front end's: `model.data.detokenizer`)."""
    if params.num_beams > 1:
        return BeamDecoder(params, prompt_ids, eos_ids)
    if params.n > 1:
        return ParallelDecoder(
            [TokenDecoder(params, prompt_ids, eos_ids, seed_offset=i) for i in range(params.n)]
        )
    return TokenDecoder(params, prompt_ids, eos_ids)
