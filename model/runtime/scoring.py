"""Scoring given candidate answers (multiple choice, zero-shot classification): nothing is generated.

Each candidate's tokens are scored by the language model given the image and the prompt: the log-softmax
of the logits at each of its positions, teacher-forced, as a forward pass of transformers over
`prompt + candidate` gives them. BLIP's VQA ranks its answer list this way (`rank_answer`), as LAVIS'
InstructBLIP `predict_class` does for class names. A step's scoring requests run in two batched passes:

1. prefill: every request's prompt once (image queries + prompt for OPT and BLIP captioning; Flan-T5's
   encoder and BLIP VQA's question encoder, then the decoder's start token) into a temporary cache with
   one slot per request, as generation prefills (`model.prefill`). Its logits score each candidate's
   first token.
2. candidates: the tokens of every candidate of every request but its last, as rows of one batched
   forward at the positions after their request's prefix. Each row reads its request's prefix keys and
   values from the temporary cache (never copied per candidate, `PrefixKV`) and its own causally; an
   encoder-decoder row cross-attends to its request's cached source. Its logits score the next tokens.

Which tokens a candidate is (`model.processing.InputProcessor.candidate_ids`):
- continuations (BLIP-2 OPT, BLIP captioning: the decoder reads the prompt): the tokens of
  `" " + candidate` (stripped) after a text prompt, as the tokenizer splits `"prompt candidate"` when the
  prompt does not end in whitespace; of `candidate` alone after no prompt (captioning). No end token:
  the candidate is scored as the text that follows the prompt, whatever would come after it.
- answer decoders (BLIP-2 Flan-T5, BLIP VQA: the decoder starts from its own start token): the
  candidate's tokens and the model's end token (Flan-T5's `</s>`, BLIP's `[SEP]`), the whole target as
  their tokenizers make it and as BLIP's `rank_answer` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.kv_cache import AttnBatch, CrossCache, KVCache
from .device import device_index, to_device
from .plan import ScoringOutput, ScoringWork


@dataclass
class CandidateScore:
    index: int  # its place in the request's list
    text: str
    logprob: float  # the sum of its tokens' log-probabilities (natural log)
    mean_logprob: float  # per token: logprob / tokens
    tokens: int  # how many tokens were scored (the end token included, where there is one)


@dataclass
class ScoringResult:
    candidates: list[CandidateScore]  # ranked: the highest logprob first (ties: request order)
    prompt_tokens: int

    @property
    def text(self) -> str:
        """The best candidate."""
        return self.candidates[0].text


def rank(texts: list[str], output: ScoringOutput, prompt_tokens: int) -> ScoringResult:
    """Each candidate's sum and mean log-probability, best first."""
    scores = [
        CandidateScore(i, text, sum(lps), sum(lps) / len(lps), len(lps))
        for i, (text, lps) in enumerate(zip(texts, output.logprobs, strict=True))
    ]
    return ScoringResult(sorted(scores, key=lambda s: -s.logprob), prompt_tokens)


class PrefixKV:
    """A decoder's self-attention keys/values for the candidate rows: row r reads the prefix of slot
    `rows[r]` of the prefill cache (its first `width` positions; the mask hides those past the row's own
    prefix) and then the keys the rows write this forward. Quacks like `KVCache` (update, read)."""

    def __init__(self, prefix: KVCache, rows: torch.Tensor, width: int):
        self.prefix, self.rows, self.width = prefix, rows, width
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, batch: AttnBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the rows' keys and values [N, H, T, D] of `layer` until `read`."""
        self.new[layer] = (k, v)

    def read(self, layer: int, batch: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H, width + T, D]: each row's prefix, then the rows' own keys (values alike)."""
        k, v = self.new.pop(layer)
        keys = self.prefix.k[layer, self.rows, :, : self.width]
        values = self.prefix.v[layer, self.rows, :, : self.width]
        return torch.cat([keys, k.to(keys.dtype)], dim=2), torch.cat([values, v.to(values.dtype)], dim=2)


def rows_batch(rows: torch.Tensor, prefix: torch.Tensor, width: int, length: int) -> AttnBatch:
    """Candidate rows of `length` tokens: row r's tokens at positions prefix[r] + 0 .. length - 1; each
    sees the first prefix[r] of the `width` prefix keys and its own tokens up to itself."""
    steps = torch.arange(length, device=rows.device)
    keys = torch.arange(width + length, device=rows.device)
    in_prefix = keys[None, None, :] < prefix[:, None, None]
    own = (keys >= width)[None, None, :] & (keys[None, None, :] - width <= steps[None, :, None])
    mask = torch.where(keys[None, None, :] < width, in_prefix, own)[:, None]
    positions = prefix[:, None] + steps[None, :]
    return AttnBatch(rows, positions, is_prefill=False, kv_len=width + length, mask=mask)


def _rows_logits(
    model: torch.nn.Module, tokens: torch.Tensor, batch: AttnBatch, cache: KVCache | CrossCache, width: int
) -> torch.Tensor:
    """Logits [N, T, vocab] (fp32) of the candidate rows, each over its request's prefix in `cache`."""
    if isinstance(cache, CrossCache):  # the source stays in the prefill cache's slot of each row
        rows_cache = CrossCache(PrefixKV(cache.own, batch.slots, width), cache.cross, cache.lengths)
    else:
        rows_cache = PrefixKV(cache, batch.slots, width)
    return model.rows_logits(tokens, batch, rows_cache)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., target]: logits [..., vocab] fp32, targets [...] -> [...]."""
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


@torch.inference_mode()
def run_scorings(
    model: torch.nn.Module, works: list[ScoringWork], embeds: dict[str, torch.Tensor]
) -> dict[int, ScoringOutput]:
    """Score a step's candidates: one prefill of every request's prompt, then one forward of every
    candidate's tokens over its request's prefix (see the module's docstring). `embeds`: the image
    stage's output by image key. Returns each request's `ScoringOutput` by seq_id."""
    device = model.device
    prefixes = [w.prefix_positions for w in works]
    width = max(prefixes)
    cache = model.new_cache(len(works), max(w.source_positions for w in works))
    inputs = [model.prompt_inputs(embeds[w.image_key], w.text_ids) for w in works]
    first = model.prefill(inputs, torch.arange(len(works), device=device), cache)
    cands = [(i, c) for i, w in enumerate(works) for c in w.candidates]
    slots = device_index([i for i, _ in cands], device)
    heads = device_index([c[0] for _, c in cands], device)
    scores = [_token_logprobs(first[slots], heads)[:, None]]
    length = max(len(c) for _, c in cands) - 1
    if length > 0:
        padded = [c + [c[-1]] * (length + 1 - len(c)) for _, c in cands]
        ids = to_device(torch.tensor(padded, dtype=torch.long), device)
        batch = rows_batch(slots, device_index([prefixes[i] for i, _ in cands], device), width, length)
        logits = _rows_logits(model, ids[:, :-1], batch, cache, width)
        scores.append(_token_logprobs(logits, ids[:, 1:]))
    table = torch.cat(scores, dim=1).tolist()
    out: dict[int, ScoringOutput] = {}
    row = 0
    for w in works:
        logprobs = [table[row + j][: len(c)] for j, c in enumerate(w.candidates)]
        out[w.seq_id] = ScoringOutput(logprobs)
        row += len(w.candidates)
    return out
