"""Micro-benchmarks of the Cython core against its pure-Python twin (pytest-benchmark).

Run from the repository root (the pyproject's testpaths only names tests/, so pass bench/micro)::

    python -m pytest bench/micro --benchmark-only -q

Each test records, besides pytest-benchmark's own table, a per-item figure in
``extra_info`` (ns per frame / message, MB/s); the summary printed at the end shows the
median of every benchmark next to those figures, one section per benchmark group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Comparing against the twin only means something if the compiled core is what is measured.
import teomq._core.command_parser  # noqa: E402
import teomq._core.crc32c  # noqa: E402
import teomq._core.dispatch  # noqa: E402
import teomq._core.frame_codec  # noqa: E402
import teomq._core.ring_queue  # noqa: E402
import teomq._core.routes  # noqa: E402

for _mod in (teomq._core.crc32c, teomq._core.frame_codec, teomq._core.dispatch, teomq._core.ring_queue,
             teomq._core.command_parser, teomq._core.routes):
    assert _mod.__file__ is not None and not _mod.__file__.endswith(".py"), (
        f"{_mod.__name__} is not the compiled module: build the core first (pip install -e . or setup.py build_ext -i)"
    )


@dataclass
class Row:
    group: str
    name: str
    median_s: float
    figures: dict[str, Any] = field(default_factory=dict)


_ROWS: list[Row] = []


class Reporter:
    """Given to tests as the ``report`` fixture: turns the benchmark's median into per-item figures."""

    def __init__(self, benchmark: Any, request: pytest.FixtureRequest) -> None:
        self._benchmark = benchmark
        self._request = request

    def __call__(self, *, items: int = 1, item: str = "op", nbytes: int = 0, **extra: Any) -> None:
        """Record ns per item (and MB/s when ``nbytes`` is given) from the median round.

        Args:
            items: how many items (frames, messages) one call of the benchmarked function handles.
            item: the item's name in the figure's key, e.g. ``ns_per_msg``.
            nbytes: bytes one call processes; gives ``MB_per_s`` (10**6 bytes per second).
            extra: anything else to show in extra_info.
        """
        bm = self._benchmark
        bm.extra_info.update(extra)
        stats = getattr(bm, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        median = stats.stats.median
        bm.extra_info[f"ns_per_{item}"] = round(median / items * 1e9, 1)
        if nbytes:
            bm.extra_info["MB_per_s"] = round(nbytes / median / 1e6, 1)
        _ROWS.append(Row(bm.group or "-", self._request.node.name, median, dict(bm.extra_info)))


@pytest.fixture
def report(benchmark: Any, request: pytest.FixtureRequest) -> Iterator[Reporter]:
    yield Reporter(benchmark, request)


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("teomq micro-benchmarks: medians")
    groups: dict[str, list[Row]] = {}
    for row in _ROWS:
        groups.setdefault(row.group, []).append(row)
    for group, rows in groups.items():
        fastest = min(r.median_s for r in rows)
        tr.write_line(f"[{group}]")
        for r in sorted(rows, key=lambda r: r.median_s):
            figs = ", ".join(f"{k}={v}" for k, v in r.figures.items())
            tr.write_line(f"  {r.name:<44} median {_fmt_time(r.median_s):>10}  "
                          f"x{r.median_s / fastest:<8.1f} {figs}")
