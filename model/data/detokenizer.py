"""Text of generated tokens, made on the front end a window at a time, and stop strings applied there.

The engine reports only the tokens each output gained since its last report (`unreported`); the front
end (the HTTP process, or the offline API's loop) turns them into text with an `IncrementalDetokenizer`
per output: each step decodes a short window in the context of the tokens before it and never the
whole output again (vLLM's `detokenize_incrementally`, `v1/engine/detokenizer.py`). The text equals
`TextTokenizer.decode(tokens, prompt_ids)`: what the tokens add to the decoder's prompt, stripped.

`RequestText` keeps a request's outputs: it cuts an output at the token whose text first holds a stop
string (as the engine's stop check did), streams text deltas that add up to the final text (never half
a character, never text that might begin a stop string), and says when every output has ended so that
the engine can be told to stop the request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..decoding.generation import SamplingParams, TokenLogprob, TokenOutput
from .textstream import INCOMPLETE, first_stop
from .tokenizer import CONTEXT_TOKENS, TextTokenizer, text_after


class NewTokens(msgspec.Struct, array_like=True):
    """One output's part of an engine report (`Progress`, `Done`): its tokens (and log-probabilities)
    since the last report, and its finish reason once it ended."""

    tokens: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


NOTHING = NewTokens([])


def unreported(outputs: list[TokenOutput], reported: list[int]) -> list[NewTokens] | None:
    """The engine side's report: for each output, the tokens (and log-probabilities) not reported yet
    and its finish reason if it ended since the last report. `reported[i]` counts the tokens of output
    i reported so far, -1 once its end was reported too; it is updated (grown to `len(outputs)`).
    Returns one entry per output, or None when nothing is new."""
    if len(reported) < len(outputs):
        reported.extend([0] * (len(outputs) - len(reported)))
    news, new = [], False
    for i, out in enumerate(outputs):
        start = reported[i]
        if start < 0 or (start == len(out.tokens) and out.finish_reason is None):
            news.append(NOTHING)
            continue
        new = True
        lps = out.logprobs[start:] if out.logprobs is not None else None
        news.append(NewTokens(out.tokens[start:], out.finish_reason, lps))
        reported[i] = -1 if out.finish_reason is not None else len(out.tokens)
    return news if new else None


class IncrementalDetokenizer:
    """The text one output's tokens add after the decoder's prompt, decoded a window at a time.

    A window is the tokens since the last point where the text was complete (`read`), decoded after
    the ones before that point (`prefix`, never empty of text: a token's piece depends on whether one
    precedes it, a WordPiece `##` or a SentencePiece `▁`); what the window adds is its text past the
    prefix's. A window whose text ends inside a character (U+FFFD) stays open until it completes."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int]):
        self._tokenizer = tokenizer.tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])  # the prompt's last tokens, as `decode` reads
        self.prefix = 0  # the window's context starts here...
        self.read = len(self.ids)  # ...and its new tokens here
        self.prefix_text: str | None = self._decode(self.ids)
        self.settled = ""  # the text of the tokens before `read`
        self.pending = ""  # the text of the tokens from `read` (ends inside a character)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tokens: Sequence[int]) -> None:
        """Append tokens: decode the open window once (and the last one's tokens, as the new context)."""
        if not tokens:
            return
        if self.prefix_text is None:  # the last window closed: its tokens are the next one's context
            context = self._decode(self.ids[self.read_closed :])
            if context:  # text: the window's first token is not first in its decode
                self.prefix, self.prefix_text = self.read_closed, context
            else:  # special tokens alone (skipped): keep the older context
                self.prefix_text = self.closed_text
            self.read = self.read_closed
        self.ids.extend(tokens)
        text = self._decode(self.ids[self.prefix :])
        new = text_after(self.prefix_text, text)  # as `TextTokenizer.decode`
        if new.endswith(INCOMPLETE):
            self.pending = new
            return
        self.settled += new
        self.pending = ""
        # Close the window; the next push decodes its tokens as context (not needed after the last).
        self.read_closed, self.closed_text, self.prefix_text = len(self.ids), text, None

    @property
    def raw(self) -> str:
        """The text so far, unstripped (a character not complete yet as U+FFFD)."""
        return self.settled + self.pending

    @property
    def complete(self) -> int:
        """How much of `raw` is complete characters: all but the U+FFFD that ends an open window (an
        unfinished byte sequence is not text yet; what it becomes, the next tokens tell)."""
        return len(self.settled) + len(self.pending) - (1 if self.pending else 0)

    def since(self, at: int) -> str:
        """`raw[at:]` without building `raw`."""
        if at <= len(self.settled):
            return self.settled[at:] + self.pending
        return self.pending[at - len(self.settled) :]


@dataclass
class Update:
    """New text (and tokens, log-probabilities) of one output since its last update."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # set on the last update of the output
    tokens: list[int] = field(default_factory=list)


class OutputText:
    """One output on the front end: its tokens, their text, its end, and what was streamed of it.

    Positions are indices into the detokenizer's `raw` text; the text is `raw[start:]` stripped (as
    `TextTokenizer.decode`), cut before the earliest stop string. A stop string ends the output at the
    first token whose text holds it, whether the tokens come a step at a time (greedy and sampled rows)
    or whole at the end (beams). While the output runs, its text is the complete characters only (a
    trailing U+FFFD of an unfinished byte sequence is not text yet: never half a character); once it
    ended (`finish_reason`), the whole text, as `TextTokenizer.decode` gives it."""

    def __init__(self, tokenizer: TextTokenizer | None, prompt_ids: Sequence[int], stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stop = stop if tokenizer is not None else ()
        self.longest = max((len(s) for s in self.stop), default=0)
        self.hold = max(self.longest - 1, 0)  # trailing characters that might begin a stop string
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.stopped_here = False  # ended by a stop string seen here, not by the engine
        self.start: int | None = None  # where the text begins (None: nothing but whitespace yet)
        self.stop_at: int | None = None  # where the earliest stop string begins
        self.checked = 0  # the text before this is settled and holds no stop string
        self.sent = 0  # the text before this was streamed
        self.sent_tokens = 0

    def add(self, out: NewTokens | TokenOutput) -> None:
        """Take a report's new tokens (those after a stop string are dropped) and its end."""
        if self.stopped_here:
            return
        tokens, lps = out.tokens, out.logprobs
        if self.detok is not None and self.stop:
            for k, token in enumerate(tokens):  # the stop string's token is the output's last
                self.detok.push((token,))
                if self._find_stop():
                    tokens, lps = tokens[: k + 1], lps[: k + 1] if lps is not None else None
                    self.stopped_here = True
                    break
        elif self.detok is not None:
            self.detok.push(tokens)
        self.tokens += tokens
        if lps is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += lps
        if self.stopped_here:
            self.finish_reason = "stop"
        elif out.finish_reason is not None:
            self.close(out.finish_reason)

    def close(self, reason: str) -> None:
        """The output ended (`reason`: the engine's finish reason): its whole text is final, a trailing
        U+FFFD included, so a stop string is looked for once more (it ends at the last token)."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.finish_reason = "stop" if self._find_stop() else reason

    def _end(self) -> int:
        """Where the text that counts ends in `raw`: all of it once the output ended, else its complete
        characters (`IncrementalDetokenizer.complete`)."""
        return len(self.detok.raw) if self.finish_reason is not None else self.detok.complete

    def _find_stop(self) -> bool:
        """Look for a stop string in the text the last tokens added (and the `longest - 1` characters
        before it, where one could begin)."""
        if not self.stop or self.stop_at is not None:
            return self.stop_at is not None
        if self._begin() is None:
            return False
        at = max(self.start, self.checked - self.longest + 1)
        region = self.detok.since(at)[: max(0, self._end() - at)].rstrip()
        hit = first_stop(region, self.stop)
        if hit is not None:
            self.stop_at = at + hit
            return True
        self.checked = max(self.checked, min(at + len(region), len(self.detok.settled)))
        return False

    def _begin(self) -> int | None:
        """Where the text begins (after the leading whitespace), once a character other than one came."""
        if self.start is None and self.detok is not None:
            raw = self.detok.raw[: self._end()]  # whitespace so far: short
            if raw.strip():
                self.start = len(raw) - len(raw.lstrip())
                self.checked = self.sent = self.start
        return self.start

    @property
    def text(self) -> str:
        """The final text: the tokens' text stripped, cut before the earliest stop string."""
        if self.detok is None or self._begin() is None:
            return ""
        if self.stop_at is not None:
            return self.detok.since(self.start)[: self.stop_at - self.start]
        return self.detok.since(self.start).rstrip()

    def update(self, index: int, final: bool) -> Update:
        """The text, tokens and log-probabilities not streamed yet. Until `final` (or a stop string),
        the text holds back a character not complete yet and what might begin a stop string."""
        new_tokens = self.tokens[self.sent_tokens :]
        lps = self.logprobs[self.sent_tokens :] if self.logprobs is not None else []
        self.sent_tokens = len(self.tokens)
        text = ""
        if self.detok is not None and self._begin() is not None:
            rest = self.detok.since(self.sent)
            if self.stop_at is not None:
                rest = rest[: max(0, self.stop_at - self.sent)]
            elif final:
                rest = rest.rstrip()
            else:
                rest = rest.rstrip().rstrip(INCOMPLETE)
                rest = rest[: max(0, len(rest) - self.hold)]
            text, self.sent = rest, self.sent + len(rest)
        return Update(index, text, lps, self.finish_reason if final else None, new_tokens)


class RequestText:
    """A generation request's outputs on the front end, from the engine's reports (`unreported`).

    Without a tokenizer it only gathers the tokens (no text, no stop strings)."""

    def __init__(self, tokenizer: TextTokenizer | None, prompt_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.stop = tuple(params.stop)
        # Greedy and sampled requests have n outputs from the start; beams report theirs at the end.
        self.expected = 0 if params.num_beams > 1 else params.n
        self.outputs: list[OutputText] = []

    def _take(self, deltas: list[NewTokens]) -> list[int]:
        """Apply a report; the indices of the outputs it touched."""
        touched = []
        for i, delta in enumerate(deltas):
            while len(self.outputs) <= i:
                self.outputs.append(OutputText(self.tokenizer, self.prompt_ids, self.stop))
            if delta.tokens or delta.finish_reason is not None:
                self.outputs[i].add(delta)
                touched.append(i)
        return touched

    def add(self, deltas: list[NewTokens]) -> list[Update]:
        """A progress report: the streaming updates with something in them (text or new tokens)."""
        updates = [self.outputs[i].update(i, final=False) for i in self._take(deltas)]
        return [u for u in updates if u.text or u.tokens]

    @property
    def ended_here(self) -> bool:
        """Every output has ended, one at least by a stop string seen here: the engine should stop the
        request (its outputs are final)."""
        outs = self.outputs
        return (
            len(outs) >= max(self.expected, 1)
            and all(o.finish_reason is not None for o in outs)
            and any(o.stopped_here for o in outs)
        )

    def finish(self, deltas: list[NewTokens]) -> list[Update]:
        """The last report: the rest of every output, each update with its finish reason."""
        self._take(deltas)
        for out in self.outputs:
            out.close("length")
        return [out.update(i, final=True) for i, out in enumerate(self.outputs)]

    def token_outputs(self) -> list[TokenOutput]:
        """Each output's tokens (cut at a stop string), finish reason and log-probabilities."""
        return [TokenOutput(list(o.tokens), o.finish_reason, o.logprobs) for o in self.outputs]

    def texts(self) -> list[str] | None:
        """Each output's final text; None without a tokenizer."""
        return [o.text for o in self.outputs] if self.tokenizer is not None else None


class OfflineFrontEnd:
    """The offline API's front end (what `batching.client.EngineClient` is to the server): after each
    step, the new tokens of every request with stop strings get their text (`RequestText`); a request
    whose outputs all ended at one is stopped (`stop(seq)`: the engine loop's cancel), as the server
    aborts it. `seqs`: each request's scheduler sequence, read through `outputs()`."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        requests: Sequence,
        seqs: Sequence,
        stop: Callable[[Any], None],
    ):
        self.seqs = seqs
        self.stop = stop
        self.texts = [RequestText(tokenizer, r.prompt_ids, r.params) for r in requests]
        self.reported: list[list[int]] = [[] for _ in requests]
        # Greedy and sampled requests with stop strings are followed step by step; the others at the end.
        self.followed = [i for i, r in enumerate(requests) if r.params.stop and r.params.num_beams == 1]

    def step(self) -> None:
        """Read the last step's tokens (called once they are read back)."""
        for i in self.followed:
            seq, text = self.seqs[i], self.texts[i]
            if text.ended_here:
                continue
            news = unreported(seq.outputs(), self.reported[i])
            if news is not None:
                text.add(news)
            if text.ended_here and seq.finish_reason is None:
                self.stop(seq)  # as the server's abort: no further step

    def results(self) -> list[tuple[list[TokenOutput], list[str] | None]]:
        """Each request's outputs (cut at stop strings) and their texts, once every request is done."""
        out = []
        for seq, text, reported in zip(self.seqs, self.texts, self.reported, strict=True):
            if not text.ended_here:
                text.finish(unreported(seq.outputs(), reported) or [])
            out.append((text.token_outputs(), text.texts()))
        return out
