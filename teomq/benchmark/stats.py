"""Latency statistics over raw samples: exact nearest-rank percentiles and a 1-2-5 histogram.

Samples arrive as the bytes of int64 arrays (``array("q").tobytes()``), one per client, in ns.
numpy is used when present (a test extra); the pure-Python path gives the same figures.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import Any

QUANTILES = (50.0, 90.0, 99.0, 99.9)

#: histogram bucket upper bounds in µs: 1, 2, 5, 10, 20, 50, ... 5e6 (then "more")
BUCKET_BOUNDS_US = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ascending values: the smallest value with at
    least q % of the values at or below it (numpy's ``method="inverted_cdf"``)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    return sorted_values[min(n - 1, max(0, math.ceil(q / 100 * n) - 1))]


def summarize(chunks: Sequence[bytes], qs: Sequence[float] = QUANTILES) -> dict[str, Any]:
    """Merge int64 ns samples; return µs figures: ``p50``... (nearest rank), max, mean, samples,
    and ``histogram``: [[upper bound µs, count], ...] over 1-2-5 buckets (None = above the last)."""
    try:
        import numpy as np
    except ImportError:
        return _summarize_py(chunks, qs)
    arr = np.concatenate([np.frombuffer(b, dtype=np.int64) for b in chunks] or [np.zeros(0, np.int64)])
    if arr.size == 0:
        return _empty(qs)
    pct = np.percentile(arr, list(qs), method="inverted_cdf") / 1e3
    bounds_ns = np.array(BUCKET_BOUNDS_US, dtype=np.int64) * 1000
    idx = np.searchsorted(bounds_ns, arr, side="left")  # bucket i holds (bound[i-1], bound[i]]
    counts = np.bincount(idx, minlength=len(BUCKET_BOUNDS_US) + 1)
    return _doc(qs, [float(x) for x in pct], float(arr.max()) / 1e3, float(arr.mean()) / 1e3,
                int(arr.size), [int(c) for c in counts])


def _summarize_py(chunks: Sequence[bytes], qs: Sequence[float]) -> dict[str, Any]:
    merged: list[int] = []
    for b in chunks:
        merged.extend(array.array("q", b))
    if not merged:
        return _empty(qs)
    merged.sort()
    counts = [0] * (len(BUCKET_BOUNDS_US) + 1)
    i = 0
    for v in merged:  # ascending: walk the bounds once
        while i < len(BUCKET_BOUNDS_US) and v > BUCKET_BOUNDS_US[i] * 1000:
            i += 1
        counts[i] += 1
    n = len(merged)
    return _doc(qs, [nearest_rank(merged, q) / 1e3 for q in qs], merged[-1] / 1e3, sum(merged) / n / 1e3,
                n, counts)


def _doc(qs: Sequence[float], pct: list[float], mx: float, mean: float, n: int,
         counts: list[int]) -> dict[str, Any]:
    bounds: list[Any] = [*BUCKET_BOUNDS_US, None]
    hist = [[b, c] for b, c in zip(bounds, counts, strict=True) if c]
    return {**{f"p{q:g}": round(v, 1) for q, v in zip(qs, pct, strict=True)},
            "max": round(mx, 1), "mean": round(mean, 1), "samples": n, "histogram": hist}


def _empty(qs: Sequence[float]) -> dict[str, Any]:
    return {**{f"p{q:g}": None for q in qs}, "max": None, "mean": None, "samples": 0, "histogram": []}
