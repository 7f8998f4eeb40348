"""Ring queue: MsgRing (C structs, payload copied into malloc'd blocks) against a deque of tuples.

Group ring-1000: push 1,000 messages of 100 bytes, then pop all 1,000. The MsgRing figures
go through its Python view (push/pop/push_head), which the broker does not use: the dispatch
loop calls push_back/pop_front in C. So this is the ring plus a bytes object per pop, an
upper bound of the ring's cost, not the broker's.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import pytest

from teomq._core.ring_queue import MsgRing

N = 1000
PAYLOAD = os.urandom(100)


@pytest.mark.benchmark(group="ring-1000")
def test_msgring_push_pop(benchmark: Any, report: Any) -> None:
    ring = MsgRing(1024, 10**6)
    push, pop = ring.push, ring.pop

    def run() -> None:
        for i in range(N):
            push(PAYLOAD, i)
        for _ in range(N):
            pop()

    benchmark(run)
    assert len(ring) == 0
    report(items=N, item="msg")


@pytest.mark.benchmark(group="ring-1000")
def test_msgring_push_head_pop(benchmark: Any, report: Any) -> None:
    ring = MsgRing(1024, 10**6)
    push_head, pop = ring.push_head, ring.pop

    def run() -> None:
        for i in range(N):
            push_head(PAYLOAD, i)
        for _ in range(N):
            pop()

    benchmark(run)
    assert len(ring) == 0
    report(items=N, item="msg")


@pytest.mark.benchmark(group="ring-1000")
def test_deque_baseline(benchmark: Any, report: Any) -> None:
    q: deque[tuple[int, bytes]] = deque()
    append, popleft = q.append, q.popleft

    def run() -> None:
        for i in range(N):
            append((i, PAYLOAD))
        for _ in range(N):
            popleft()

    benchmark(run)
    assert not q
    report(items=N, item="msg")
