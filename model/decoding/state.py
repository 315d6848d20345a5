"""Each request's decoding state, owned by the scheduler: its tokens so far, when it is done.

A request holds `SampledRows` (greedy or sampled: n independent rows, one cache slot each, sharing the
request's prefill) or a `BeamSearch` (`model.decoding.beam`: `num_beams` rows). The scheduler asks it
for the plain data of its next step (`prefill_work`, `decode_work`), hands the runner's plain answer
(`SequenceOutput`) to `take`, which appends the tokens and applies the stop tokens, the stop check,
max_new_tokens and min_new_tokens; `outputs()` are the results so far (final once done).

Overlap (a step launched before the last one's tokens are read back): a row counts the tokens launched
for it and not read yet (`pending`): the next step's position and noise step count them, and a row that
ends drops the token of the step that ran ahead of its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.plan import SamplingSpec, SequenceOutput, SequenceWork
from .beam import BeamSearch
from .generation import FinishReason, SamplerMode, SamplingParams, TokenLogprob, TokenOutput
from .sampling import noise_key


def sampling_spec(params: SamplingParams, eos_ids: tuple[int, ...], keep: int = 0) -> SamplingSpec:
    """The runner's view of a request's settings (`SamplingSpec`)."""
    return SamplingSpec(
        params.mode,
        params.temperature,
        params.top_k,
        params.top_p,
        params.min_new_tokens,
        tuple(eos_ids),
        params.logprobs,
        params.repetition_penalty,
        params.no_repeat_ngram_size,
        keep,
    )


@dataclass
class Row:
    """One output row: its tokens, their log-probabilities, why it ended, tokens launched and unread."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    pending: int = 0

    @property
    def made(self) -> int:
        """Tokens generated, counting those launched and not read back yet."""
        return len(self.tokens) + self.pending


class SampledRows:
    """Greedy or sampled decoding of one request: `n` rows, each on its own (its own noise key, the
    i-th of n drawing as a request with seed + i would); the request is done when every row is."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        eos_ids: tuple[int, ...],
    ):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.eos_ids = tuple(eos_ids)
        self.rows = [Row() for _ in range(params.n)]
        self.keys = [noise_key(params.seed, i) if params.do_sample else 0 for i in range(params.n)]
        self.spec = sampling_spec(params, self.eos_ids)
        self.finish_reason: FinishReason | None = None
        self.max_new_tokens = params.max_new_tokens
        self.prompt_len = len(self.prompt_ids)
        self._decode: SequenceWork | None = None  # the one row's decode work, reused step to step

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def runnable(self) -> list[int]:
        """Rows that take part in the next decode step: not ended, launched tokens below max_new_tokens."""
        limit = self.params.max_new_tokens
        return [i for i, r in enumerate(self.rows) if r.finish_reason is None and r.made < limit]

    def prefill_work(
        self, seq_id: int, slots: list[int], image_key: str, text_ids: list[int]
    ) -> SequenceWork:
        """The prefill step's work (every row; slot 0 is prefilled, the others copy it)."""
        rows = list(range(len(self.rows)))
        prompt = self.prompt_ids if self.spec.reads_history else None
        return self._work(seq_id, slots, rows, image_key=image_key, text_ids=text_ids, prompt_ids=prompt)

    def decode_work(self, seq_id: int, slots: list[int]) -> SequenceWork | None:
        """The next decode step's work, or None when no row runs in it. Each row's input token is its
        slot's last pick, on the device (the sampler writes it there)."""
        if len(self.rows) == 1:  # the common case, without the list work (host time per step)
            row = self.rows[0]
            made = len(row.tokens) + row.pending
            if row.finish_reason is not None or made >= self.max_new_tokens:
                return None
            row.pending += 1
            work = self._decode
            if work is None or work.slots is not slots:
                # One work for the request's life, updated in place: a plan's work is read at its
                # launch (positions) and, for the rows and ids, until its tokens are taken, none of
                # which a later step changes.
                work = SequenceWork(seq_id, slots, self.spec, 0, self.keys, prompt_len=self.prompt_len)
                work.tokens, work.rows, self._decode = [None], [0], work
            work.generated = made
            work.positions = [self.prompt_len + made - 1]
            return work
        rows = self.runnable()
        if not rows:
            return None
        made = self.rows[rows[0]].made
        positions = [len(self.prompt_ids) + made - 1] * len(rows)
        return self._work(
            seq_id, [slots[i] for i in rows], rows, positions=positions, tokens=[None] * len(rows)
        )

    def _work(self, seq_id: int, slots: list[int], rows: list[int], **kw) -> SequenceWork:
        for i in rows:  # launched now, read back by `take`
            self.rows[i].pending += 1
        made = self.rows[rows[0]].made - 1
        keys = [self.keys[i] for i in rows]
        return SequenceWork(seq_id, slots, self.spec, made, keys, rows=rows, prompt_len=self.prompt_len, **kw)

    def take(self, work: SequenceWork, out: SequenceOutput) -> int:
        """Append a step's tokens to the rows it ran; returns how many were appended (a row that ended
        before this step's token, launched ahead of its end, drops it)."""
        if len(self.rows) == 1:
            return self._take_one(out)
        appended = 0
        for j, (i, token) in enumerate(zip(work.rows, out.tokens, strict=True)):
            row = self.rows[i]
            row.pending = max(0, row.pending - 1)
            if row.finish_reason is not None:
                continue
            row.tokens.append(token)
            if self.params.logprobs is not None and out.logprobs is not None:
                row.logprobs.append(out.logprobs[j])
            appended += 1
            # A stop token before min_new_tokens does not end the row (vLLM's `check_stop`); the
            # sampler rules the stop tokens out of those steps, so it never picks one there.
            eos = token in self.eos_ids and len(row.tokens) >= self.params.min_new_tokens
            if eos:
                row.finish_reason = FinishReason.STOP
            elif len(row.tokens) >= self.params.max_new_tokens:
                row.finish_reason = FinishReason.LENGTH
        if self.finish_reason is None and all(r.finish_reason is not None for r in self.rows):
            reasons = {r.finish_reason for r in self.rows}
            self.finish_reason = FinishReason.LENGTH if FinishReason.LENGTH in reasons else FinishReason.STOP
        return appended

    def _take_one(self, out: SequenceOutput) -> int:
        """`take` for one row (the common case), with no per-row loop."""
        row = self.rows[0]
        if row.pending:
            row.pending -= 1
        if row.finish_reason is not None:
            return 0
        token = out.tokens[0]
        row.tokens.append(token)
        if out.logprobs is not None and self.params.logprobs is not None:
            row.logprobs.append(out.logprobs[0])
        stopped = token in self.eos_ids and len(row.tokens) >= self.params.min_new_tokens
        if stopped:
            row.finish_reason = self.finish_reason = FinishReason.STOP
        elif len(row.tokens) >= self.params.max_new_tokens:
            row.finish_reason = self.finish_reason = FinishReason.LENGTH
        return 1

    def abort(self, reason: FinishReason) -> None:
        """The request left (cancelled, timed out): tokens of steps still in flight are dropped."""
        for row in self.rows:
            if row.finish_reason is None:
                row.finish_reason = reason
        self.finish_reason = self.finish_reason or reason

    def outputs(self) -> list[TokenOutput]:
        logprobs = self.params.logprobs is not None
        return [
            TokenOutput(list(r.tokens), r.finish_reason, list(r.logprobs) if logprobs else None)
            for r in self.rows
        ]


DecodeState = SampledRows | BeamSearch


def new_state(
    params: SamplingParams,
    prompt_ids: list[int],
    eos_ids: tuple[int, ...],
) -> DecodeState:
    """The decode state of a request's sampler mode. Stop strings are the front end's
    (`model.data.detokenizer`): it aborts a request whose outputs all ended at one."""
    if params.mode is SamplerMode.BEAM:
        return BeamSearch(params, prompt_ids, eos_ids)
    return SampledRows(params, prompt_ids, eos_ids)
