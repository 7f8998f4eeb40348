"""Periodic ``-stat`` lines of the teomq command-line programs.

Every line goes to stdout, one per interval, flushed, in this shape::

    stat: <key>=<int> <key>=<int> ... rate=<int>/s

where ``rate`` is how much the counter named by ``rate_key`` grew per second over the
last interval (rounded to a whole number). Tests and scripts parse these lines. A broker in
the command scheme follows each with one line per command that has subscribers or waiting
messages::

    stat: command <name> routing=<fanout|queue> queued=<int> subscribers=<int> in=<int> out=<int>

and, with the web port on, one line of the WebSocket gateway's counters::

    stat: web sessions=<int> consumers=<int> pushes=<int> encodes=<int> bad_packets=<int>
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["command_lines", "format_stat", "print_stats", "web_line"]

Emit = Callable[[str], None]


def format_stat(counters: Mapping[str, int], fields: Sequence[str], rate: float) -> str:
    """``stat: a=1 b=2 rate=3/s`` for the named ``fields`` of ``counters``."""
    parts = [f"{name}={int(counters.get(name, 0))}" for name in fields]
    parts.append(f"rate={max(0.0, rate):.0f}/s")
    return "stat: " + " ".join(parts)


async def print_stats(
    interval: float,
    sample: Callable[[], Mapping[str, int]],
    fields: Sequence[str],
    rate_key: str,
    emit: Emit,
    more: Callable[[], Sequence[str]] | None = None,
) -> None:
    """Emit a stat line every ``interval`` seconds until cancelled (then the lines of ``more()``)."""
    prev_count = int(sample().get(rate_key, 0))
    prev_time = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        counters = sample()
        now = time.monotonic()
        count = int(counters.get(rate_key, 0))
        elapsed = now - prev_time
        rate = (count - prev_count) / elapsed if elapsed > 0 else 0.0
        prev_count, prev_time = count, now
        emit(format_stat(counters, fields, rate))
        for line in more() if more is not None else ():
            emit(line)


def command_lines(stats: Sequence[Mapping[str, object]]) -> list[str]:
    """The per-command stat lines of commands with subscribers or waiting messages."""
    return [f"stat: command {r['name']} routing={r['routing']} queued={r['queued']} "
            f"subscribers={r['subscribers']} in={r['in']} out={r['out']}"
            for r in stats if r["subscribers"] or r["queued"]]


def web_line(stats: Mapping[str, int]) -> str:
    """The web gateway's stat line."""
    return "stat: web " + " ".join(f"{k}={stats[k]}" for k in ("sessions", "consumers", "pushes", "encodes",
                                                                "bad_packets"))
