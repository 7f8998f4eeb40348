"""A self-drawn progress bar on stderr, redrawn about 4 times a second.

``[#########.............]  4.2/12.0 s  measure  158,203 msg/s`` for a timed run, or
``[####..................]  41,000/200,000  drain  96,310 msg/s`` for a counted one. Drawn
only on a terminal; :class:`NoProgress` stands in otherwise, so a log stays clean.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from typing import TextIO

REDRAW_S = 0.25
RATE_WINDOW_S = 1.0  # the rate shown is over the last second: clients report every 0.25 s, unaligned


class NoProgress:
    """Draws nothing."""

    def phase(self, label: str, total: float, unit: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def update(self, done: float, count: int, label: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class ProgressBar(NoProgress):
    """One line on ``stream``, overwritten in place with ``\\r``; finish() clears it."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.label = ""
        self.total = 0.0
        self.unit = "s"
        self._last_draw = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._drawn = False

    def phase(self, label: str, total: float, unit: str) -> None:
        """Start a phase: ``total`` seconds (unit "s") or messages (unit "msg")."""
        self.label, self.total, self.unit = label, total, unit
        self._samples.clear()

    def status(self, text: str) -> None:
        """A line of text instead of the bar (e.g. while the clients start)."""
        self._write(text)

    def update(self, done: float, count: int, label: str | None = None) -> None:
        """``done``: seconds or messages so far in the phase; ``count``: messages so far (for the rate)."""
        if label is not None:
            self.label = label
        now = time.monotonic()
        samples = self._samples
        if not samples or samples[-1][1] != count:
            samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        if now - self._last_draw < REDRAW_S:
            return
        self._last_draw = now
        t0, n0 = samples[0]
        rate = (count - n0) / (now - t0) if now - t0 > 0.1 else 0.0
        self._draw(done, rate)

    def _draw(self, done: float, rate: float) -> None:
        frac = min(1.0, done / self.total) if self.total > 0 else 0.0
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        if self.unit == "s":
            where = f"{done:5.1f}/{self.total:.1f} s"
        else:
            where = f"{int(done):,}/{int(self.total):,}"
        self._write(f"[{bar}] {where}  {self.label}  {rate:,.0f} msg/s")

    def _write(self, line: str) -> None:
        cols = shutil.get_terminal_size((80, 20)).columns
        try:
            self.stream.write("\r" + line[: cols - 1].ljust(cols - 1))
            self.stream.flush()
        except (OSError, ValueError):
            return
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            cols = shutil.get_terminal_size((80, 20)).columns
            try:
                self.stream.write("\r" + " " * (cols - 1) + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False


def make_progress(enabled: bool, stream: TextIO | None = None) -> NoProgress:
    """A bar if ``enabled`` and the stream is a terminal, else one that draws nothing."""
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return ProgressBar(stream) if enabled and tty else NoProgress()
