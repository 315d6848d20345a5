"""Beam search, a port of `transformers`' vectorised `_beam_search` (default `early_stopping=False`).

Each request holds a `BeamDecoder`: `num_beams` running hypotheses and the best `num_beams` finished
ones. A step starts from the `keep` best (beam, token) candidates of a request (running score plus
log-probability, top-k over beams x vocab), which the runner computes on the device for many requests
at once; `advance_beams` then moves a whole group of requests (same `num_beams`) in one set of small
tensor ops on the host, as transformers does for a batch, so its cost per step does not grow with one
set of ops per request. Only the hypotheses' token lists are handled request by request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .generation import SamplingParams, Step, TokenLogprob, TokenOutput, process_logits, token_logprobs

NEG = -1.0e9  # transformers' "impossible" score


class BeamDecoder:
    """Beam search for one request: `num_beams` rows."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: tuple[int, ...]):
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
        # The runner scores this request's beams together with others' (`model.decoding.choice`) unless a
        # processor reads its history (repetition penalty, no-repeat n-grams) or it keeps logprobs; it
        # then moves with `advance_beams`.
        self.batched = "beam" if not params.reads_history and params.logprobs is None else None

    @property
    def num_rows(self) -> int:
        return self.params.num_beams

    def blocks_eos(self) -> bool:
        """min_new_tokens not reached yet: the stop tokens are ruled out of this step."""
        return len(self.running[0]) < self.params.min_new_tokens

    def active(self) -> list[int]:
        return [] if self.finish_reason else list(range(self.params.num_beams))

    def cached_length(self) -> int:
        """Positions of each beam's slot that hold keys/values once the step that chose its last token
        has run: the prompt and every token but that last one."""
        return len(self.prompt_ids) + len(self.running[0]) - 1

    def exhausted(self) -> bool:
        return False  # never stepped ahead of its tokens: each step's reorder needs the host first

    def feed(self) -> list[tuple[int, int | None, int]]:
        position = self.cached_length()  # the last chosen token goes right after what is cached
        return [(i, seq[-1], position) for i, seq in enumerate(self.running)]

    def step(self, logits: torch.Tensor) -> Step:
        """This request alone (logits processors, logprobs): its log-probabilities on the host."""
        history = torch.tensor([self.prompt_ids + seq for seq in self.running], device=logits.device)
        eos = torch.tensor(self.eos_ids, device=logits.device)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        processed = process_logits(log_probs, history, self.params, len(self.running[0]), eos).cpu()
        flat = (processed + self.running_scores[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(flat, k=self.keep)
        return advance_beams([self], top_scores[None], top_index[None], logits.shape[-1], [processed])[0]

    def candidate_logprobs(
        self, processed: torch.Tensor | None, parents: list[int], tokens: list[int]
    ) -> list[list[TokenLogprob]]:
        """Each candidate's history plus its new token's entry (as output_scores[beam_indices])."""
        if self.params.logprobs is None or processed is None:
            return [[] for _ in parents]
        entries = token_logprobs(processed[parents], tokens, self.params.logprobs)
        return [self.running_lp[p] + [e] for p, e in zip(parents, entries, strict=True)]

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


def advance_beams(
    decoders: list[BeamDecoder],
    top_scores: torch.Tensor,
    top_index: torch.Tensor,
    vocab: int,
    processed: list[torch.Tensor | None] | None = None,
) -> list[Step]:
    """One step of G requests with the same `num_beams` and `keep`, from their best candidates:
    `top_scores` [G, keep] (running score + log-probability) and `top_index` [G, keep] (beam * vocab +
    token), on the CPU. `processed[g]` (request g's log-probabilities [beams, vocab]) serves logprobs."""
    n, keep = decoders[0].params.num_beams, decoders[0].keep
    parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
    generated = [len(d.running[0]) for d in decoders]
    hits = torch.tensor(
        [
            [g + 1 >= d.params.max_new_tokens or t in d.eos_ids for t in toks]
            for d, g, toks in zip(decoders, generated, tokens, strict=True)
        ]
    )
    # Next running beams: the best candidates that did not just finish.
    masked = top_scores + hits.float() * NEG
    next_rank = torch.topk(masked, k=n, dim=-1)[1]
    running_scores = masked.gather(1, next_rank)
    divisor = torch.tensor(
        [(g + 1) ** d.params.length_penalty for d, g in zip(decoders, generated, strict=True)]
    )

    # Finished hypotheses: the best n of those kept so far and the candidates that just finished.
    just = hits & (torch.arange(keep) < n)
    scores = top_scores / divisor[:, None]
    was_improvable = torch.tensor([d.improvable for d in decoders])
    scores = scores + (~was_improvable)[:, None].float() * NEG
    scores = scores + (~just) * NEG
    merged_scores = torch.cat((torch.stack([d.finished_scores for d in decoders]), scores), dim=1)
    merged_done = torch.cat((torch.stack([d.is_finished for d in decoders]), just), dim=1)
    best = torch.topk(merged_scores, k=n, dim=-1)[1]
    finished_scores, is_finished = merged_scores.gather(1, best), merged_done.gather(1, best)

    worst = torch.where(is_finished, finished_scores.min(dim=-1, keepdim=True)[0], torch.tensor(NEG))
    improvable = was_improvable & ((running_scores[:, :1] / divisor[:, None]) > worst).any(dim=-1)
    done = (~improvable | hits.all(dim=-1)).tolist()
    steps = []
    rank_rows, best_rows = next_rank.tolist(), best.tolist()
    for g, d in enumerate(decoders):
        candidates = [d.running[p] + [t] for p, t in zip(parents[g], tokens[g], strict=True)]
        cand_lp = d.candidate_logprobs(processed[g] if processed else None, parents[g], tokens[g])
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


def _step(d: BeamDecoder, done: bool, parents: list[int]) -> Step:
    if done:
        best = d.finished[0]
        d.finish_reason = "stop" if best[-1:] and best[-1] in d.eos_ids else "length"
        return Step(parents=[], tokens=[], done=True)
    return Step(parents=parents, tokens=[s[-1] for s in d.running], done=False)
