"""Beam search, a port of `transformers`' vectorised `_beam_search` (default `early_stopping=False`).

Each request holds a `BeamSearch` (owned by the scheduler): `num_beams` running hypotheses and the best
`num_beams` finished ones. A step starts from the `keep` best (beam, token) candidates of a request
(running score plus processed log-probability, top-k over beams x vocab), which the runner's sampler
computes on the device for many requests at once (`model.decoding.sampler`) and returns as plain data;
`advance_beams` then moves a whole group of requests (same `num_beams`) in one set of small tensor ops on
the host, as transformers does for a batch, so its cost per step does not grow with one set of ops per
request. Only the hypotheses' token lists are handled request by request. The cache slots follow their
beams: the scheduler plans each step's reorder (`reorder_moves`) as data for the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.plan import CacheMoves, SequenceOutput, SequenceWork
from .generation import FinishReason, SamplingParams, TokenLogprob, TokenOutput

NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamStep:
    """What one step did to a request's beams: row i of the next step continues row `parents[i]`."""

    parents: list[int]
    done: bool


class BeamSearch:
    """Beam search for one request: `num_beams` rows."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: tuple[int, ...]):
        from .state import sampling_spec  # the two modules describe each other's requests

        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.eos_ids = tuple(eos_ids)
        n = params.num_beams
        self.keep = max(2, 1 + len(self.eos_ids)) * n
        self.spec = sampling_spec(params, self.eos_ids, self.keep)
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
        self.finish_reason: FinishReason | None = None
        # The last step's parents, until the next step's plan moves the cache slots after them.
        self.parents: list[int] | None = None

    @property
    def num_rows(self) -> int:
        return self.params.num_beams

    def cached_length(self) -> int:
        """Positions of each beam's slot that hold keys/values once the step that chose its last token
        has run: the prompt and every token but that last one."""
        return len(self.prompt_ids) + len(self.running[0]) - 1

    def prefill_work(
        self, seq_id: int, slots: list[int], image_key: str, text_ids: list[int]
    ) -> SequenceWork:
        """The prefill step's work: every beam starts from the prompt's logits."""
        return self._work(seq_id, slots, image_key=image_key, text_ids=text_ids)

    def decode_work(self, seq_id: int, slots: list[int]) -> SequenceWork | None:
        """The next decode step's work: each beam feeds its last token, right after what is cached."""
        if self.finish_reason is not None:
            return None
        position = self.cached_length()
        tokens: list[int | None] = [seq[-1] for seq in self.running]
        return self._work(seq_id, slots, positions=[position] * len(slots), tokens=tokens)

    def _work(self, seq_id: int, slots: list[int], **kw) -> SequenceWork:
        history = [self.prompt_ids + seq for seq in self.running] if self.spec.reads_history else None
        rows = list(range(self.num_rows))
        scores = self.running_scores.tolist()
        generated = len(self.running[0])
        return SequenceWork(
            seq_id,
            slots,
            self.spec,
            generated,
            history=history,
            beam_scores=scores,
            rows=rows,
            prompt_len=len(self.prompt_ids),
            **kw,
        )

    def reorder_moves(self, slots: list[int], moves: CacheMoves) -> None:
        """Add the last step's slot moves (each beam's slot takes its parent's keys/values) to `moves`."""
        if self.parents is None or self.finish_reason is not None:
            return
        moves.src += [slots[p] for p in self.parents]
        moves.dst += slots
        moves.upto = max(moves.upto, self.cached_length())
        self.parents = None

    def candidate_logprobs(self, out: SequenceOutput) -> list[list[TokenLogprob]]:
        """Each candidate's history plus its new token's entry (as output_scores[beam_indices])."""
        if self.params.logprobs is None or out.logprobs is None:
            return [[] for _ in out.parents]
        return [self.running_lp[p] + [e] for p, e in zip(out.parents, out.logprobs, strict=True)]

    def abort(self, reason: FinishReason) -> None:
        """The request left (cancelled, timed out)."""
        self.finish_reason = self.finish_reason or reason

    def outputs(self) -> list[TokenOutput]:
        """The n best finished hypotheses, best first; nothing before the search ends."""
        if self.finish_reason is None:
            return []
        outs = []
        for seq, lps in zip(self.finished[: self.params.n], self.finished_lp, strict=False):
            reason = FinishReason.STOP if seq[-1:] and seq[-1] in self.eos_ids else FinishReason.LENGTH
            outs.append(
                TokenOutput(list(seq), reason, list(lps) if self.params.logprobs is not None else None)
            )
        return outs


def advance_beams(searches: list[BeamSearch], outs: list[SequenceOutput]) -> list[BeamStep]:
    """One step of G requests with the same `num_beams` and `keep`, from the sampler's best candidates
    of each (`outs`: parents, tokens, scores = running score + processed log-probability, best first;
    logprobs: each candidate's entry). Their scores are float32 values, exact through the host's floats."""
    n, keep = searches[0].params.num_beams, searches[0].keep
    parents, tokens = [o.parents for o in outs], [o.candidates for o in outs]
    top_scores = torch.tensor([o.scores for o in outs], dtype=torch.float32)
    generated = [len(d.running[0]) for d in searches]
    hits = torch.tensor(
        [
            [g + 1 >= d.params.max_new_tokens or t in d.eos_ids for t in toks]
            for d, g, toks in zip(searches, generated, tokens, strict=True)
        ]
    )
    # Next running beams: the best candidates that did not just finish.
    masked = top_scores + hits.float() * NEG
    next_rank = torch.topk(masked, k=n, dim=-1)[1]
    running_scores = masked.gather(1, next_rank)
    divisor = torch.tensor(
        [(g + 1) ** d.params.length_penalty for d, g in zip(searches, generated, strict=True)]
    )

    # Finished hypotheses: the best n of those kept so far and the candidates that just finished.
    just = hits & (torch.arange(keep) < n)
    scores = top_scores / divisor[:, None]
    was_improvable = torch.tensor([d.improvable for d in searches])
    scores = scores + (~was_improvable)[:, None].float() * NEG
    scores = scores + (~just) * NEG
    merged_scores = torch.cat((torch.stack([d.finished_scores for d in searches]), scores), dim=1)
    merged_done = torch.cat((torch.stack([d.is_finished for d in searches]), just), dim=1)
    best = torch.topk(merged_scores, k=n, dim=-1)[1]
    finished_scores, is_finished = merged_scores.gather(1, best), merged_done.gather(1, best)

    worst = torch.where(is_finished, finished_scores.min(dim=-1, keepdim=True)[0], torch.tensor(NEG))
    improvable = was_improvable & ((running_scores[:, :1] / divisor[:, None]) > worst).any(dim=-1)
    done = (~improvable | hits.all(dim=-1)).tolist()
    steps = []
    rank_rows, best_rows = next_rank.tolist(), best.tolist()
    for g, d in enumerate(searches):
        candidates = [d.running[p] + [t] for p, t in zip(parents[g], tokens[g], strict=True)]
        cand_lp = d.candidate_logprobs(outs[g])
        merged, merged_lp = d.finished + candidates, d.finished_lp + cand_lp
        d.running = [candidates[i] for i in rank_rows[g]]
        d.running_lp = [cand_lp[i] for i in rank_rows[g]]
        d.finished = [merged[i] for i in best_rows[g]]
        d.finished_lp = [merged_lp[i] for i in best_rows[g]]
        d.running_scores, d.finished_scores, d.is_finished = (
            running_scores[g],
            finished_scores[g],
            is_finished[g],
        )
        d.improvable = bool(improvable[g])
        steps.append(_step(d, done[g], [parents[g][i] for i in rank_rows[g]]))
    return steps


def _step(d: BeamSearch, done: bool, parents: list[int]) -> BeamStep:
    if done:
        best = d.finished[0]
        d.finish_reason = FinishReason.STOP if best[-1:] and best[-1] in d.eos_ids else FinishReason.LENGTH
        return BeamStep(parents=[], done=True)
    d.parents = parents
    return BeamStep(parents=parents, done=False)
