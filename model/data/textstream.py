"""Stop strings in text: where the earliest one begins.

The text of generated tokens is made a window at a time on the front end (`model.data.detokenizer`),
which also streams it: deltas that add up to exactly the final text, never ending inside a multi-byte
character (byte-level BPE decodes half a character as U+FFFD), and holding back the last
`len(longest stop string) - 1` characters until it is clear they do not begin a stop string.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a dangling UTF-8 byte sequence decodes to


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest of the stop strings begins in `text` (a character index); None if none does."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return min(cuts) if cuts else None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether there was one."""
    at = first_stop(text, stop)
    return (text, False) if at is None else (text[:at], True)
