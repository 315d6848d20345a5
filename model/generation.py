"""Per-request decoding: parameters, logits processing, token choice and beam search bookkeeping.

Each request owns one `Decoder` (a `TokenDecoder` for greedy/sampling, a `BeamDecoder` for beams).
`step(logits)` takes the next-token logits of the request's rows and returns a `Step`: for each row that
keeps running, which previous row it continues (beam reordering) and the token it appends. The
arithmetic follows `transformers`' `generate` so that greedy and beam search give identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
            "num_beams": self.num_beams >= 1,
            "temperature": self.temperature > 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported")

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no logits processing: the row's argmax is its token (batched fast path)."""
        return not self.do_sample and self.num_beams == 1 and self.repetition_penalty == 1.0


@dataclass
class Step:
    """What one decode step did to a request's rows."""

    # For each row that runs in the next step, the index of the row it continues (always i for one row).
    parents: list[int]
    # The token each continuing row appends (and feeds to the next step).
    tokens: list[int]
    # True once the request is complete; its rows leave the batch.
    done: bool


def process_logits(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, generated: int, eos: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty and min_new_tokens, as `transformers`' processors (same order)."""
    if params.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
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


@dataclass
class TokenDecoder:
    """Greedy or sampled decoding of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    eos_ids: tuple[int, ...]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.do_sample:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)

    @property
    def num_rows(self) -> int:
        return 1

    def last_tokens(self) -> list[int]:
        """The token each row feeds to the next decode step."""
        return self.tokens[-1:]

    def length(self) -> int:
        """Tokens in the sequence so far: placeholders, prompt and generated."""
        return len(self.prompt_ids) + len(self.tokens)

    def allows_eos(self) -> bool:
        return len(self.tokens) >= self.params.min_new_tokens

    def step(self, logits: torch.Tensor) -> Step:
        device = logits.device
        history = torch.tensor([self.prompt_ids + self.tokens], device=device)
        eos = torch.tensor(self.eos_ids, device=device)
        scores = process_logits(logits.float(), history, self.params, len(self.tokens), eos)
        if self.params.do_sample:
            probs = warp_for_sampling(scores, self.params).softmax(-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        return self.append(token)

    def append(self, token: int) -> Step:
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        done = self.finish_reason is not None
        return Step(parents=[] if done else [0], tokens=[] if done else [token], done=done)

    def result(self) -> list[int]:
        return list(self.tokens)


NEG = -1.0e9  # transformers' "impossible" score


class BeamDecoder:
    """Beam search for one request, a port of `transformers`' vectorised `_beam_search` for batch size 1
    (default `early_stopping=False`): `num_beams` running rows, the best `num_beams` finished hypotheses."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: tuple[int, ...]):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.eos_ids = tuple(eos_ids)
        n = params.num_beams
        self.keep = max(2, 1 + len(self.eos_ids)) * n
        self.running: list[list[int]] = [[] for _ in range(n)]
        # Only the first beam is live at the start: the others are copies of it.
        self.running_scores = torch.full((n,), NEG)
        self.running_scores[0] = 0.0
        self.finished: list[list[int]] = [[] for _ in range(n)]
        self.finished_scores = torch.full((n,), NEG)
        self.is_finished = torch.zeros(n, dtype=torch.bool)
        self.improvable = True
        self.finish_reason: str | None = None

    @property
    def num_rows(self) -> int:
        return self.params.num_beams

    def last_tokens(self) -> list[int]:
        return [seq[-1] for seq in self.running]

    def length(self) -> int:
        return len(self.prompt_ids) + len(self.running[0])

    def allows_eos(self) -> bool:
        return len(self.running[0]) >= self.params.min_new_tokens

    def _log_probs(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        history = torch.tensor([self.prompt_ids + seq for seq in self.running], device=logits.device)
        eos = torch.tensor(self.eos_ids, device=logits.device)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process_logits(log_probs, history, self.params, generated, eos).cpu()
        return log_probs + self.running_scores[:, None]

    def step(self, logits: torch.Tensor) -> Step:
        n, generated = self.params.num_beams, len(self.running[0])
        flat = self._log_probs(logits, generated).reshape(-1)
        vocab = logits.shape[-1]
        top_scores, top_index = torch.topk(flat, k=self.keep)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        length_hit = generated + 1 >= self.params.max_new_tokens
        hits = torch.tensor([length_hit or t in self.eos_ids for t in tokens])

        # Next running beams: the best candidates that did not just finish.
        next_rank = torch.topk(top_scores + hits.float() * NEG, k=n)[1].tolist()
        self.running = [candidates[i] for i in next_rank]
        self.running_scores = (top_scores + hits.float() * NEG)[next_rank]

        self._update_finished(candidates, top_scores, hits, generated + 1)
        best_running = self.running_scores[0] / ((generated + 1) ** self.params.length_penalty)
        worst = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_running > worst).any())
        done = not self.improvable or bool(hits.all())
        if done:
            self.finish_reason = (
                "stop" if self.result()[-1:] and self.result()[-1] in self.eos_ids else "length"
            )
            return Step(parents=[], tokens=[], done=True)
        return Step(parents=[parents[i] for i in next_rank], tokens=[s[-1] for s in self.running], done=False)

    def _update_finished(
        self, candidates: list[list[int]], scores: torch.Tensor, hits: torch.Tensor, length: int
    ) -> None:
        n = self.params.num_beams
        just_finished = hits & (torch.arange(self.keep) < n)
        scores = scores / (length**self.params.length_penalty)
        if not self.improvable:
            scores = scores + NEG
        scores = scores + (~just_finished) * NEG
        merged_scores = torch.cat((self.finished_scores, scores))
        merged = self.finished + candidates
        merged_done = torch.cat((self.is_finished, just_finished))
        best = torch.topk(merged_scores, k=n)[1].tolist()
        self.finished = [merged[i] for i in best]
        self.finished_scores = merged_scores[best]
        self.is_finished = merged_done[best]

    def result(self) -> list[int]:
        return list(self.finished[0])


Decoder = TokenDecoder | BeamDecoder


def new_decoder(params: SamplingParams, prompt_ids: list[int], eos_ids: tuple[int, ...]) -> Decoder:
    if params.num_beams > 1:
        return BeamDecoder(params, prompt_ids, eos_ids)
    return TokenDecoder(params, prompt_ids, eos_ids)
