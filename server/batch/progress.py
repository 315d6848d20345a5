"""Progress of a batch job on stderr: a tqdm bar (rows done / total, images/s, ETA, errors), plain lines
for logs (`--progress plain`: one every few seconds), or nothing (`--quiet`); a summary at the end."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 5.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`mode`: bar | plain | none. `skipped` rows (finished in an earlier run) count as done but not in
    the rate."""

    def __init__(self, mode: str, total: int, skipped: int = 0, stream: TextIO | None = None):
        self.mode = mode
        self.total = total
        self.done = skipped
        self.skipped = skipped
        self.errors = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self.stream = stream or sys.stderr
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=skipped, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1
            )
            self._bar.set_postfix(errors=0)

    @property
    def rate(self) -> float:
        """Images answered per second by this run."""
        elapsed = time.monotonic() - self.start
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if self._bar is not None:
            self._bar.update(1)
            if not ok:
                self._bar.set_postfix(errors=self.errors)
        elif self.mode == "plain" and time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._last_line = time.monotonic()
            self._line()

    def note(self, message: str) -> None:
        """A line on the stream in every mode (above the bar, which tqdm redraws below it)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def _line(self) -> None:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        print(
            f"rows {self.done}/{self.total} ({pct:.1f}%)  {rate:.2f} images/s  errors {self.errors}  "
            f"ETA {_clock(left)}",
            file=self.stream,
            flush=True,
        )

    def close(self, summary: str) -> None:
        """Close the bar and print the summary (not with mode none)."""
        if self._bar is not None:
            self._bar.close()
        if self.mode != "none":
            print(summary, file=self.stream, flush=True)
