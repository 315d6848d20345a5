"""Each request's next token(s) from a stage's logits, batched across requests.

The runner hands a stage's logits (one row per active row of each request, in order) to `pick`, which
launches the batched work on the device without reading anything back: one argmax for every plain greedy
row, one warp-and-draw for every plain sampled row (`model.decoding.sampling`), one log-softmax and top-k per group
of beam requests (`model.decoding.beam`). Only then, once every stage of the step is launched, `apply` reads the
results back (one wait for the device) and moves each request's decoder; the other requests (repetition
penalty, logprobs) step on their own rows. Beam reorders of the step are made as one cache copy.

The batched picks are also written, on the device, into the runner's per-slot token buffer: the next
decode step reads its input tokens from there, so it can be launched before these are read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..arch.kv_cache import CrossCache, KVCache
from ..runtime.device import device_index, to_device
from ..runtime.plan import SequenceWork, StepOutput
from .beam import BeamDecoder, advance_beams
from .decoders import ParallelDecoder, SampleRow
from .generation import Step
from .sampling import sample, warp_rows


@dataclass
class Picks:
    """One stage's logits and which of its requests take a batched token choice."""

    works: list[SequenceWork]
    logits: torch.Tensor  # [rows, vocab], the requests' active rows in order
    offsets: list[int] = field(default_factory=list)  # first row of each request
    counts: list[int] = field(default_factory=list)  # rows of each request
    plain: list[int] = field(default_factory=list)  # plain greedy requests (one row each), by index
    greedy: torch.Tensor | None = None  # [len(plain)] their argmax, still on the device
    sampled: list[int] = field(default_factory=list)  # plain sampled requests (one row per sample)
    drawn: torch.Tensor | None = None  # their rows' tokens, in order, still on the device
    # Beam requests scored together: (request indices, [G, keep] top scores, [G, keep] top indices).
    beams: list[tuple[list[int], torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # On CUDA: greedy, drawn and beams are copies in page-locked host memory, filled asynchronously
    # once this event is reached. `apply` waits for it alone, not for the stream: a step launched
    # since then keeps running.
    ready: torch.cuda.Event | None = None


@dataclass
class _Moves:
    """Cache slot moves of one step's beam reorders (sources read before any write)."""

    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    upto: int = 0  # positions that hold keys/values in any moved slot


def _block_eos(rows: torch.Tensor, blocked: list[int], eos: tuple[int, ...]) -> torch.Tensor:
    """`rows` with the stop tokens at -inf in the `blocked` rows (min_new_tokens not reached yet)."""
    if not blocked or not eos:
        return rows
    rows = rows.clone()
    index = device_index(blocked, rows.device)[:, None]
    rows[index, device_index(list(eos), rows.device)[None, :]] = -float("inf")
    return rows


def _beam_candidates(
    logits: torch.Tensor, decoders: list[BeamDecoder], offsets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` best (beam, token) candidates of each beam request, all scored at once on the device:
    log-softmax, plus each beam's running score, top-k over beams x vocab. [G, keep] scores and indices."""
    n, vocab = decoders[0].num_rows, logits.shape[-1]
    rows = device_index([o + j for o in offsets for j in range(n)], logits.device)
    log_probs = F.log_softmax(logits[rows].float(), dim=-1)
    # As transformers: processors (here min_new_tokens) act on the log-probabilities.
    blocked = [g * n + j for g, d in enumerate(decoders) if d.blocks_eos() for j in range(n)]
    log_probs = _block_eos(log_probs, blocked, decoders[0].eos_ids).view(len(decoders), n, vocab)
    running = torch.stack([d.running_scores for d in decoders]).to(logits.device)
    flat = (log_probs + running[:, :, None]).reshape(len(decoders), n * vocab)
    return torch.topk(flat, k=decoders[0].keep, dim=-1)


def _draw(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """One token per row: each row's temperature / top-k / top-p, then its own seeded noise."""
    warped = warp_rows(
        logits.float(), [r.temperature for r in rows], [r.top_k for r in rows], [r.top_p for r in rows]
    )
    meta = to_device(torch.tensor([[r.key for r in rows], [r.step for r in rows]]), logits.device)
    return sample(warped, meta[0], meta[1])


def pick(works: list[SequenceWork], logits: torch.Tensor, slot_tokens: torch.Tensor | None = None) -> Picks:
    """Launch the batched argmax of the plain greedy rows, the batched draw of the plain sampled
    rows and the batched beam scoring on the device; nothing is read back yet. The batched tokens go
    into `slot_tokens` (the runner's [slots] buffer of each slot's last token) and count as pending in
    their decoders until `apply` reads them."""
    picks = Picks(works, logits)
    row, sample_rows, specs, blocked = 0, [], [], {"greedy": [], "sample": []}
    greedy_slots: list[int] = []  # where each plain row's token goes in `slot_tokens`
    sampled_slots: list[int] = []
    beams: dict[int, list[int]] = {}  # beam requests scored together, by beams per request
    for i, w in enumerate(works):  # each request's rows in `logits`: its active rows (all at prefill)
        d = w.decoder
        picks.offsets.append(row)
        if d.batched == "argmax":
            if d.blocks_eos():
                blocked["greedy"].append(len(picks.plain))
            picks.plain.append(i)
            picks.counts.append(1)
            greedy_slots.append(w.slots[0])
            d.pending += 1
        elif d.batched == "sample":
            rows = d.sample_rows()
            if d.blocks_eos():
                blocked["sample"] += range(len(specs), len(specs) + len(rows))
            subs = d.subs if isinstance(d, ParallelDecoder) else [d]
            for j in d.active():
                sampled_slots.append(w.slots[j])
                subs[j].pending += 1
            picks.sampled.append(i)
            picks.counts.append(len(rows))
            sample_rows += range(row, row + len(rows))
            specs += rows
        elif d.batched == "beam":
            beams.setdefault(d.num_rows, []).append(i)
            picks.counts.append(d.num_rows)
        else:
            picks.counts.append(len(d.active()))
        row += picks.counts[-1]
    eos = works[0].decoder.eos_ids if works else ()
    if picks.plain:
        every = len(picks.plain) == row  # every row is a plain greedy request: no gather
        rows = logits if every else logits[[picks.offsets[i] for i in picks.plain]]
        picks.greedy = _block_eos(rows, blocked["greedy"], eos).argmax(-1)
    if specs:
        rows = logits if len(sample_rows) == row else logits[sample_rows]
        picks.drawn = _draw(_block_eos(rows.float(), blocked["sample"], eos), specs)
    for group in beams.values():
        decoders = [works[i].decoder for i in group]
        offsets = [picks.offsets[i] for i in group]
        picks.beams.append((group, *_beam_candidates(logits, decoders, offsets)))
    if slot_tokens is not None and (greedy_slots or sampled_slots):
        chosen = [t for t in (picks.greedy, picks.drawn) if t is not None]
        tokens = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
        slot_tokens.index_copy_(0, device_index(greedy_slots + sampled_slots, logits.device), tokens)
    if logits.device.type == "cuda":
        _copy_to_host(picks)
    return picks


def _copy_to_host(picks: Picks) -> None:
    """Start the copies of the step's choices into page-locked memory and mark when they are done."""

    def host(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    if picks.greedy is not None:
        picks.greedy = host(picks.greedy)
    if picks.drawn is not None:
        picks.drawn = host(picks.drawn)
    picks.beams = [(group, host(scores), host(index)) for group, scores, index in picks.beams]
    picks.ready = torch.cuda.Event()
    picks.ready.record()


def apply(picks: Picks, out: StepOutput, cache: KVCache | CrossCache) -> None:
    """Each request takes its token(s): plain greedy and plain sampled ones from one device->host copy
    each; the others (beams, penalties, logprobs) from their own rows of logits."""
    if picks.ready is not None:
        picks.ready.synchronize()
    for i, token in zip(picks.plain, picks.greedy.tolist() if picks.plain else [], strict=True):
        w = picks.works[i]
        if not w.decoder.discard_if_done():
            out.steps[w.seq_id] = w.decoder.append(token)
    drawn, start = picks.drawn.tolist() if picks.sampled else [], 0
    for i in picks.sampled:
        w, count = picks.works[i], picks.counts[i]
        if not w.decoder.discard_if_done():
            out.steps[w.seq_id] = w.decoder.append_sampled(drawn[start : start + count])
        start += count
    moves = _Moves()  # every beam request's slot moves, made in one copy at the end
    vocab = picks.logits.shape[-1]
    for group, scores, index in picks.beams:
        works = [picks.works[i] for i in group]
        steps = advance_beams([w.decoder for w in works], scores.cpu(), index.cpu(), vocab)
        for w, step in zip(works, steps, strict=True):
            _reorder(w, step, moves)
            out.steps[w.seq_id] = step
    batched = set(picks.plain) | set(picks.sampled) | {i for group, _, _ in picks.beams for i in group}
    for i, w in enumerate(picks.works):
        if i not in batched:
            step = w.decoder.step(picks.logits[picks.offsets[i] : picks.offsets[i] + picks.counts[i]])
            _reorder(w, step, moves)
            out.steps[w.seq_id] = step
    if moves.src:
        cache.reorder(moves.src, moves.dst, moves.upto)


def _reorder(work: SequenceWork, step: Step, moves: _Moves) -> None:
    """Beam search: row i of the next step continues row parents[i]; its cache slot follows."""
    if isinstance(work.decoder, BeamDecoder) and not step.done:
        moves.src += [work.slots[p] for p in step.parents]
        moves.dst += work.slots
        moves.upto = max(moves.upto, work.decoder.cached_length())
