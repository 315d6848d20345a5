"""Per-request decoding state: which rows run, which token each appends, when the request is done.

Each request owns one decoder: a `TokenDecoder` (greedy or sampling, one row), a `ParallelDecoder`
(n samples, one row each, sharing the request's prefill) or a `BeamDecoder` (`num_beams` rows). The
runner asks `feed()` for the rows to run in a decode step, and hands the logits of the `active()` rows to
`step(logits)`, which returns a `Step`. `outputs()` are the results so far (final once done).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .generation import (
    SamplingParams,
    Step,
    StopCheck,
    TokenLogprob,
    TokenOutput,
    process_logits,
    token_logprobs,
    warp_for_sampling,
)
from .sampling import noise_key, sample


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
    stop_check: StopCheck | None = None
    seed_offset: int = 0  # the i-th of n samples: its own noise key from (seed, i)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        p = self.params
        # Which of the runner's batched paths serve this row (once EOS is allowed); fixed per request.
        self.plain_greedy = p.is_plain_greedy
        self.plain_sample = p.do_sample and p.repetition_penalty == 1.0 and p.logprobs is None
        self.noise_key = noise_key(p.seed, self.seed_offset) if p.do_sample else 0

    @property
    def num_rows(self) -> int:
        return 1

    def active(self) -> list[int]:
        """Rows (indices into the request's slots) that take part in the next step."""
        return [] if self.finish_reason else [0]

    def feed(self) -> list[tuple[int, int, int]]:
        """(row, token, position) of each row for the next decode step."""
        return [(0, self.tokens[-1], self.length() - 1)] if self.tokens and not self.finish_reason else []

    def length(self) -> int:
        """Tokens in the sequence so far: placeholders, prompt and generated."""
        return len(self.prompt_ids) + len(self.tokens)

    def allows_eos(self) -> bool:
        """The runner's batched greedy argmax (plain greedy, one row) is valid only once EOS is allowed."""
        return len(self.tokens) >= self.params.min_new_tokens

    def takes_argmax(self) -> bool:
        """This step's token is the plain argmax of its one row (the runner's batched fast path)."""
        return self.plain_greedy and len(self.tokens) >= self.params.min_new_tokens

    def takes_sample(self) -> bool:
        """This step's token can come from the runner's batched sampler (no penalty, no logprobs)."""
        return self.plain_sample and len(self.tokens) >= self.params.min_new_tokens

    def sample_rows(self) -> list[SampleRow]:
        p = self.params
        return [SampleRow(p.temperature, p.top_k, p.top_p, self.noise_key, len(self.tokens))]

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

    def append(self, token: int) -> Step:
        self.tokens.append(token)
        if token in self.eos_ids or (self.stop_check is not None and self.stop_check(self.tokens)):
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
        self.finish_reason: str | None = None

    @property
    def num_rows(self) -> int:
        return len(self.subs)

    def takes_argmax(self) -> bool:
        return False

    def takes_sample(self) -> bool:
        return all(self.subs[i].takes_sample() for i in self.active())

    def sample_rows(self) -> list[SampleRow]:
        return [row for i in self.active() for row in self.subs[i].sample_rows()]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.subs) if not s.finish_reason]

    def feed(self) -> list[tuple[int, int, int]]:
        return [(i, tok, pos) for i, s in enumerate(self.subs) for _, tok, pos in s.feed()]

    def step(self, logits: torch.Tensor) -> Step:
        for j, i in enumerate(self.active()):
            self.subs[i].step(logits[j : j + 1])
        return self._after_step()

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


NEG = -1.0e9  # transformers' "impossible" score


class BeamDecoder:
    """Beam search for one request, a port of `transformers`' vectorised `_beam_search` for batch size 1
    (default `early_stopping=False`): `num_beams` running rows, the best `num_beams` finished hypotheses."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        eos_ids: tuple[int, ...],
    ):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.eos_ids = tuple(eos_ids)
        n = params.num_beams
        self.keep = max(2, 1 + len(self.eos_ids)) * n
        self.running: list[list[int]] = [[] for _ in range(n)]
        # Per-token log-probabilities of each running / finished hypothesis (when requested).
        self.running_lp: list[list[TokenLogprob]] = [[] for _ in range(n)]
        # Only the first beam is live at the start: the others are copies of it.
        self.running_scores = torch.full((n,), NEG)
        self.running_scores[0] = 0.0
        self.finished: list[list[int]] = [[] for _ in range(n)]
        self.finished_lp: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finished_scores = torch.full((n,), NEG)
        self.is_finished = torch.zeros(n, dtype=torch.bool)
        self.improvable = True
        self.finish_reason: str | None = None

    @property
    def num_rows(self) -> int:
        return self.params.num_beams

    def takes_argmax(self) -> bool:
        return False

    def takes_sample(self) -> bool:
        return False

    def active(self) -> list[int]:
        return [] if self.finish_reason else list(range(self.params.num_beams))

    def feed(self) -> list[tuple[int, int, int]]:
        position = len(self.prompt_ids) + len(self.running[0]) - 1
        return [(i, seq[-1], position) for i, seq in enumerate(self.running)]

    def _log_probs(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        history = torch.tensor([self.prompt_ids + seq for seq in self.running], device=logits.device)
        eos = torch.tensor(self.eos_ids, device=logits.device)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return process_logits(log_probs, history, self.params, generated, eos).cpu()

    def step(self, logits: torch.Tensor) -> Step:
        n, generated = self.params.num_beams, len(self.running[0])
        processed = self._log_probs(logits, generated)
        flat = (processed + self.running_scores[:, None]).reshape(-1)
        vocab = logits.shape[-1]
        top_scores, top_index = torch.topk(flat, k=self.keep)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        cand_lp = self._candidate_logprobs(processed, parents, tokens)
        length_hit = generated + 1 >= self.params.max_new_tokens
        hits = torch.tensor([length_hit or t in self.eos_ids for t in tokens])

        # Next running beams: the best candidates that did not just finish.
        next_rank = torch.topk(top_scores + hits.float() * NEG, k=n)[1].tolist()
        self.running = [candidates[i] for i in next_rank]
        self.running_lp = [cand_lp[i] for i in next_rank]
        self.running_scores = (top_scores + hits.float() * NEG)[next_rank]

        self._update_finished(candidates, cand_lp, top_scores, hits, generated + 1)
        best_running = self.running_scores[0] / ((generated + 1) ** self.params.length_penalty)
        worst = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_running > worst).any())
        if not self.improvable or bool(hits.all()):
            best = self.finished[0]
            self.finish_reason = "stop" if best[-1:] and best[-1] in self.eos_ids else "length"
            return Step(parents=[], tokens=[], done=True)
        return Step(parents=[parents[i] for i in next_rank], tokens=[s[-1] for s in self.running], done=False)

    def _candidate_logprobs(
        self, processed: torch.Tensor, parents: list[int], tokens: list[int]
    ) -> list[list[TokenLogprob]]:
        """Each candidate's history plus its new token's entry (as output_scores[beam_indices])."""
        if self.params.logprobs is None:
            return [[] for _ in parents]
        entries = token_logprobs(processed[parents], tokens, self.params.logprobs)
        return [self.running_lp[p] + [e] for p, e in zip(parents, entries, strict=True)]

    def _update_finished(
        self,
        candidates: list[list[int]],
        cand_lp: list[list[TokenLogprob]],
        scores: torch.Tensor,
        hits: torch.Tensor,
        length: int,
    ) -> None:
        n = self.params.num_beams
        just_finished = hits & (torch.arange(self.keep) < n)
        scores = scores / (length**self.params.length_penalty)
        if not self.improvable:
            scores = scores + NEG
        scores = scores + (~just_finished) * NEG
        merged_scores = torch.cat((self.finished_scores, scores))
        merged = self.finished + candidates
        merged_lp = self.finished_lp + cand_lp
        merged_done = torch.cat((self.is_finished, just_finished))
        best = torch.topk(merged_scores, k=n)[1].tolist()
        self.finished = [merged[i] for i in best]
        self.finished_lp = [merged_lp[i] for i in best]
        self.finished_scores = merged_scores[best]
        self.is_finished = merged_done[best]

    def outputs(self) -> list[TokenOutput]:
        """The n best finished hypotheses, best first; nothing before the search ends."""
        if self.finish_reason is None:
            return []
        outs = []
        for seq, lps in zip(self.finished[: self.params.n], self.finished_lp, strict=False):
            reason = "stop" if seq[-1:] and seq[-1] in self.eos_ids else "length"
            outs.append(
                TokenOutput(list(seq), reason, list(lps) if self.params.logprobs is not None else None)
            )
        return outs


Decoder = TokenDecoder | ParallelDecoder | BeamDecoder


def new_decoder(
    params: SamplingParams,
    prompt_ids: list[int],
    eos_ids: tuple[int, ...],
    stop_check: StopCheck | None = None,
) -> Decoder:
    """Stop strings end greedy and sampled rows early; beam hypotheses are cut at them afterwards."""
    if params.num_beams > 1:
        return BeamDecoder(params, prompt_ids, eos_ids)
    if params.n > 1:
        return ParallelDecoder(
            [TokenDecoder(params, prompt_ids, eos_ids, stop_check, seed_offset=i) for i in range(params.n)]
        )
    return TokenDecoder(params, prompt_ids, eos_ids, stop_check)
