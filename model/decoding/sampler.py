"""The batched sampler: every sequence's next token(s) from a stage's logits, on the device.

The runner hands a stage's logits (one row per slot of each `SequenceWork`, in order) to `launch`, which
queues the whole choice on the device and reads nothing back: for the GREEDY and SAMPLE rows of every
request at once, the logits processors (repetition penalty, no-repeat n-grams, min_new_tokens), then the
argmax or, for sampled rows, each row's temperature / top-k / top-p and its own seeded draw
(`model.decoding.sampling`), and the log-probabilities of the rows that want them (log-softmax of the
processed and warped scores, as transformers' `output_scores`: the chosen token's entry and the top k);
for BEAM requests grouped by beam count, the log-softmax, processors and each beam's running score, then
the best (beam, token) candidates (`model.decoding.beam`). The chosen tokens also go, on the device, into
the runner's per-slot token buffer, where the next decode step reads its input tokens: so that step can
be launched before these are read back. `read` then waits once for the device and returns plain data
(`SequenceOutput` per request); the scheduler appends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..runtime.device import device_index, host_longs, to_device
from ..runtime.plan import SequenceOutput, SequenceWork
from .generation import SamplerMode, TokenLogprob
from .processors import history_processors
from .sampling import sample, warp_rows


@dataclass
class Sampled:
    """One stage's choices, queued on the device; `read` turns them into `SequenceOutput`s."""

    works: list[SequenceWork]
    vocab: int
    token_works: list[int] = field(default_factory=list)  # GREEDY / SAMPLE works, by index, in row order
    tokens: torch.Tensor | None = None  # [rows] their rows' tokens
    lp_rows: list[int] = field(default_factory=list)  # token rows (into `tokens`) with logprobs
    # Their chosen tokens' log-probabilities [len(lp_rows)] and top alternatives [len(lp_rows), k].
    lp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Beam groups: (work indices, [G, keep] scores, [G, keep] beam * vocab + token, logprobs: the
    # candidates' processed log-probabilities [G, keep] and each beam's top k [G, beams, k] twice).
    beams: list[tuple] = field(default_factory=list)
    # On CUDA: the results are copies in page-locked host memory, filled once this event is reached.
    ready: torch.cuda.Event | None = None
    # Every work is one GREEDY / SAMPLE row without logprobs: `read` pairs works and tokens directly.
    single: bool = False


def _block_eos(rows: torch.Tensor, blocked: list[int], eos: tuple[int, ...]) -> torch.Tensor:
    """`rows` with the stop tokens at -inf in the `blocked` rows (min_new_tokens not reached yet)."""
    if not blocked or not eos:
        return rows
    rows = rows.clone()
    index = device_index(blocked, rows.device)[:, None]
    rows[index, device_index(list(eos), rows.device)[None, :]] = -float("inf")
    return rows


def _beam_histories(scores: torch.Tensor, works: list[SequenceWork]) -> torch.Tensor:
    """The history processors on beam requests' rows (`scores` [rows, vocab], the works' rows in
    order), from each beam's history on the host (beam steps read their tokens back anyway)."""
    if not any(w.sampling.reads_history for w in works):
        return scores
    rows = [(w.sampling, h) for w in works for h in (w.history or [[0]] * len(w.slots))]
    width = max(len(h) for _, h in rows)
    history = to_device(host_longs([t for _, h in rows for t in h + [0] * (width - len(h))]), scores.device)
    return history_processors(
        scores,
        history.view(len(rows), width),
        [len(h) for _, h in rows],
        [s.repetition_penalty for s, _ in rows],
        [s.no_repeat_ngram_size for s, _ in rows],
    )


def _processed(scores: torch.Tensor, works: list[SequenceWork], counts: list[int]) -> torch.Tensor:
    """The processors of beam requests' rows (`scores` [rows, vocab], the works' rows in order)."""
    scores = _beam_histories(scores, works)
    blocked: dict[tuple[int, ...], list[int]] = {}
    start = 0
    for w, n in zip(works, counts, strict=True):
        if w.generated < w.sampling.min_new_tokens:
            blocked.setdefault(w.sampling.eos_ids, []).extend(range(start, start + n))
        start += n
    for eos, rows in blocked.items():
        scores = _block_eos(scores, rows, eos)
    return scores


@dataclass
class _TokenRows:
    """What the GREEDY / SAMPLE rows of a stage need, gathered in one pass over the works."""

    logit_rows: list[int] = field(default_factory=list)  # each token row's row of logits
    slots: list[int] = field(default_factory=list)
    blocked: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # eos ids -> rows
    sampled: list[int] = field(default_factory=list)  # SAMPLE rows
    specs: list = field(default_factory=list)  # their settings, keys and noise steps
    keys: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    # Rows whose processors read their token history (from the runner's per-slot buffer): token row
    # index, slot, history length before this step's token, repetition penalty, n-gram size.
    history_rows: list[int] = field(default_factory=list)
    history_slots: list[int] = field(default_factory=list)
    history_lengths: list[int] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def launch(
    works: list[SequenceWork],
    logits: torch.Tensor,
    slot_tokens: torch.Tensor | None = None,
    row_slots: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> Sampled:
    """Queue every request's choice on `logits` [rows, vocab] (the works' slots in order); the GREEDY and
    SAMPLE tokens go into `slot_tokens` ([slots] long, each slot's last token) too. `row_slots`: the
    works' slots in order, on the device already (the decode step's), else built here. `history`
    [slots, width] int64: each slot's token history (needed when a GREEDY / SAMPLE work's processors
    read it): read for the processors, and each chosen token appended. Nothing is read back."""
    out = Sampled(works, logits.shape[-1])
    if all(w.sampling.plain for w in works):  # every row's token is its argmax: no per-work pass
        out.token_works = list(range(len(works)))
        out.single = all(len(w.slots) == 1 for w in works)
        out.tokens = logits.argmax(-1)
        if slot_tokens is not None:
            if row_slots is None:
                row_slots = device_index([s for w in works for s in w.slots], logits.device)
            slot_tokens.index_copy_(0, row_slots, out.tokens)
        if logits.device.type == "cuda":
            _copy_to_host(out)
        return out
    offsets, row, rows = [], 0, _TokenRows()
    beams: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(works):
        spec, n = w.sampling, len(w.slots)
        offsets.append(row)
        if spec.mode is SamplerMode.BEAM:
            beams.setdefault((n, spec.keep), []).append(i)
            row += n
            continue
        t = len(rows.slots)
        out.token_works.append(i)
        rows.slots += w.slots
        rows.logit_rows += range(row, row + n)
        if spec.reads_history:
            rows.history_rows += range(t, t + n)
            rows.history_slots += w.slots
            rows.history_lengths += [w.prompt_len + w.generated] * n
            rows.penalties += [spec.repetition_penalty] * n
            rows.sizes += [spec.no_repeat_ngram_size] * n
        if w.generated < spec.min_new_tokens:
            rows.blocked.setdefault(spec.eos_ids, []).extend(range(t, t + n))
        if spec.mode is SamplerMode.SAMPLE:
            rows.sampled += range(t, t + n)
            rows.specs += [spec] * n
            rows.keys += w.keys
            rows.steps += [w.generated] * n
        if spec.logprobs is not None:
            out.lp_rows += range(t, t + n)
        row += n
    out.single = not beams and not out.lp_rows and len(rows.slots) == len(works)
    if out.token_works:
        every = len(rows.logit_rows) == row
        scores = logits if every else logits[device_index(rows.logit_rows, logits.device)]
        _choose_tokens(out, scores.float(), rows, history)
        if slot_tokens is not None:
            if not every or row_slots is None:
                row_slots = device_index(rows.slots, logits.device)
            slot_tokens.index_copy_(0, row_slots, out.tokens)
    for group in beams.values():
        out.beams.append(
            (group, *_beam_candidates(logits, [works[i] for i in group], [offsets[i] for i in group]))
        )
    if logits.device.type == "cuda":
        _copy_to_host(out)
    return out


def _choose_tokens(
    out: Sampled, scores: torch.Tensor, rows: _TokenRows, history: torch.Tensor | None
) -> None:
    """The GREEDY and SAMPLE rows' tokens (and logprobs), from their rows of logits in fp32."""
    if rows.history_rows:
        scores = _device_histories(scores, rows, history)
    for eos, blocked in rows.blocked.items():
        scores = _block_eos(scores, blocked, eos)
    sampled, specs = rows.sampled, rows.specs
    if sampled:
        every = len(sampled) == scores.shape[0]
        index = None if every else device_index(sampled, scores.device)
        warped = warp_rows(
            scores if every else scores[index],
            [s.temperature for s in specs],
            [s.top_k for s in specs],
            [s.top_p for s in specs],
        )
        meta = to_device(torch.tensor([rows.keys, rows.steps]), scores.device)
        drawn = sample(warped, meta[0], meta[1])
        if every:
            out.tokens, scores = drawn, warped
        else:
            out.tokens = scores.argmax(-1).index_copy(0, index, drawn)
            if out.lp_rows:  # the sampled rows' log-probabilities are those of their warped scores
                scores = scores.index_copy(0, index, warped)
    else:
        out.tokens = scores.argmax(-1)
    if rows.history_rows:  # each chosen token joins its row's history, on the device
        index = device_index(rows.history_rows, scores.device)
        at = device_index(rows.history_slots + rows.history_lengths, scores.device).view(2, -1)
        history.index_put_((at[0], at[1]), out.tokens[index])
    if out.lp_rows:
        k = max(out.works[i].sampling.logprobs or 0 for i in out.token_works)
        index = device_index(out.lp_rows, scores.device)
        log_probs = scores[index].log_softmax(-1)
        chosen = log_probs.gather(1, out.tokens[index][:, None])[:, 0]
        out.lp = (
            (chosen, *torch.topk(log_probs, k)) if k else (chosen, log_probs[:, :0], log_probs[:, :0].long())
        )


def _device_histories(scores: torch.Tensor, rows: _TokenRows, history: torch.Tensor | None) -> torch.Tensor:
    """The history processors on the token rows that use them, their histories read from `history`."""
    if history is None:
        raise ValueError("a repetition penalty or no_repeat_ngram_size needs the runner's history buffer")
    if max(rows.history_lengths) >= history.shape[1]:
        raise ValueError(
            f"token history of {max(rows.history_lengths) + 1} exceeds the buffer's {history.shape[1]}"
        )
    index = device_index(rows.history_rows, scores.device)
    every = len(rows.history_rows) == scores.shape[0]
    slots = device_index(rows.history_slots, scores.device)
    processed = history_processors(
        scores if every else scores[index],
        history[slots],
        rows.history_lengths,
        rows.penalties,
        rows.sizes,
    )
    return processed if every else scores.index_copy(0, index, processed)


def _beam_candidates(logits: torch.Tensor, works: list[SequenceWork], offsets: list[int]) -> tuple:
    """The `keep` best (beam, token) candidates of each beam request, all scored at once on the device:
    log-softmax, the processors (as transformers, on the log-probabilities), plus each beam's running
    score, top-k over beams x vocab. With logprobs, the candidates' processed log-probabilities and
    each beam's top alternatives too."""
    n, vocab = len(works[0].slots), logits.shape[-1]
    rows = device_index([o + j for o in offsets for j in range(n)], logits.device)
    log_probs = _processed(F.log_softmax(logits[rows].float(), dim=-1), works, [n] * len(works))
    running = to_device(torch.tensor([w.beam_scores for w in works]), logits.device)
    flat = (log_probs.view(len(works), n, vocab) + running[:, :, None]).reshape(len(works), n * vocab)
    scores, index = torch.topk(flat, k=works[0].sampling.keep, dim=-1)
    k = max((w.sampling.logprobs for w in works if w.sampling.logprobs is not None), default=None)
    if k is None:
        return scores, index, None
    chosen = log_probs.view(len(works), n * vocab).gather(1, index)
    top_lp, top_id = torch.topk(log_probs, k) if k else (log_probs[:, :0], log_probs[:, :0].long())
    return scores, index, (chosen, top_lp.view(len(works), n, k), top_id.view(len(works), n, k))


def _host(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _copy_to_host(out: Sampled) -> None:
    """Start the copies of the choices into page-locked memory and mark when they are done."""
    if out.tokens is not None:
        out.tokens = _host(out.tokens)
    if out.lp is not None:
        out.lp = tuple(_host(t) for t in out.lp)
    out.beams = [
        (group, _host(s), _host(i), None if lp is None else tuple(_host(t) for t in lp))
        for group, s, i, lp in out.beams
    ]
    out.ready = torch.cuda.Event()
    out.ready.record()


def _entry(token: int, logprob: float, ids: list[int], lps: list[float], k: int) -> TokenLogprob:
    top = tuple((i, p) for i, p in zip(ids[:k], lps[:k], strict=True) if p != float("-inf"))
    return TokenLogprob(token, logprob, top)


def read(out: Sampled) -> dict[int, SequenceOutput]:
    """Wait for the choices (one wait) and return each request's, by seq_id."""
    if out.ready is not None:
        out.ready.synchronize()
    tokens = out.tokens.tolist() if out.tokens is not None else []
    if out.single:
        return {w.seq_id: SequenceOutput([t]) for w, t in zip(out.works, tokens, strict=True)}
    results: dict[int, SequenceOutput] = {}
    entries: dict[int, TokenLogprob] = {}
    if out.lp is not None:
        chosen, top_lp, top_id = (t.tolist() for t in out.lp)
        for j, r in enumerate(out.lp_rows):
            entries[r] = (chosen[j], top_id[j], top_lp[j])
    start = 0
    for i in out.token_works:
        w = out.works[i]
        n = len(w.slots)
        lps = None
        if w.sampling.logprobs is not None:
            k = w.sampling.logprobs
            lps = [_entry(tokens[r], *entries[r], k) for r in range(start, start + n)]
        results[w.seq_id] = SequenceOutput(tokens[start : start + n], lps)
        start += n
    for group, scores, index, lp in out.beams:
        scores, index = scores.tolist(), index.tolist()
        if lp is not None:
            chosen, top_lp, top_id = (t.tolist() for t in lp)
        for g, i in enumerate(group):
            w = out.works[i]
            parents = [x // out.vocab for x in index[g]]
            cands = [x % out.vocab for x in index[g]]
            lps = None
            if lp is not None and w.sampling.logprobs is not None:
                k = w.sampling.logprobs
                lps = [
                    _entry(t, c, top_id[g][p], top_lp[g][p], k)
                    for t, c, p in zip(cands, chosen[g], parents, strict=True)
                ]
            results[w.seq_id] = SequenceOutput(
                logprobs=lps, parents=parents, candidates=cands, scores=scores[g]
            )
    return results
