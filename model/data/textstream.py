"""Text of a growing token list: stop strings, and deltas for streaming.

The text is what the generated tokens add to the decoder's prompt (`TextTokenizer.continuation`), so a
first token that continues a prompt's word (WordPiece `##`) is never shown on its own. Streaming sends
the text as it grows, and the deltas must add up to exactly the final text. So a delta never ends
inside a multi-byte character (byte-level BPE decodes half a character as U+FFFD), and the last
`len(longest stop string) - 1` characters wait until it is clear they do not begin a stop string.
"""

from __future__ import annotations

from collections.abc import Callable

INCOMPLETE = "\ufffd"  # what a dangling UTF-8 byte sequence decodes to


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether there was one."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_checker(decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> Callable[[list[int]], bool]:
    """For the decoders: True once the generated tokens' text (`decode`: the tokenizer's
    `continuation` of the request's prompt) contains a stop string."""

    def check(tokens: list[int]) -> bool:
        return cut_at_stop(decode(tokens), stop)[1]

    return check


class TextStream:
    """Turns successive full texts of one output into deltas."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def delta(self, text: str, final: bool = False) -> str:
        """The new text since the last call; with `final`, everything left (`text` is then the result's)."""
        text, stopped = cut_at_stop(text, self.stop)
        if not (final or stopped):
            text = text.rstrip(INCOMPLETE)
            text = text[: max(len(self.sent), len(text) - self.hold)]
        if not text.startswith(self.sent):
            # Only a final text can disagree with what was sent (never seen with byte-level BPE).
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new
