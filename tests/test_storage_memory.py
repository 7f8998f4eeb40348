"""Bounded memory of durable queues (docs/storage.md, "Memory"): past -memory-max, queued
messages are paged out to the log (a 20-byte index entry each stays in memory) and read back
in order as consumers take them; the memory is given back after a drain.

The broker is the real CLI; its memory is read from /proc (VmHWM: the peak resident set, so a
short spike counts too). The bounds asserted are the budget plus the index entries plus a fixed
allowance over the broker's own size at start, not a timing.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import pytest

from procs import ProcGroup
from teomq.client import Consumer, Producer

pytestmark = pytest.mark.integration

HANG = 120.0
MiB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
            for k in ("VmRSS", "VmHWM")}


async def publish_numbered(spec: str, start: int, count: int, size: int = 100) -> None:
    """Messages start..start+count-1, each its number in 9 digits and padding to ``size``,
    confirmed in a window of 4,096."""
    async with Producer(spec, timeout=HANG) as p:
        for i in range(start, start + count):
            p.publish(b"%09d" % i + b"x" * (size - 9))
            if i % 1024 == 1023:
                await p.confirmed(4096)
        await p.confirmed(0)


async def drain_in_order(spec: str, count: int, *, prefetch: int = 256) -> list[int]:
    """Consume ``count`` messages; their numbers, in the order they came."""
    got: list[int] = []
    done = asyncio.Event()

    def handler(data: bytes) -> None:
        got.append(int(bytes(data[:9])))
        if len(got) == count:
            done.set()

    async with Consumer(spec, handler, prefetch=prefetch, timeout=HANG):
        await asyncio.wait_for(done.wait(), HANG)
        await asyncio.sleep(0.5)            # nothing more comes
    return got


def test_a_million_queued_messages_stay_within_the_memory_budget(procs: ProcGroup, tmp_path: Path) -> None:
    """1,000,000 queued 100-byte messages and no consumer, -memory-max 32 MiB: the broker's
    peak resident set stays under its size at start plus the budget plus 20 MiB (the index
    entries, 20 bytes each) plus a fixed 24 MiB; in memory they would take 180 MiB. A consumer then gets all
    of them in order, and the memory goes back to within 24 MiB of the start."""
    broker = procs.broker("-nomsg", "-noweb", "-memory-max", "32MiB", "-queue-max", "2000000",
                          data_dir=tmp_path / "data")
    start = memory(broker.proc.pid)["VmRSS"]
    asyncio.run(publish_numbered(broker.endpoint, 0, 1_000_000))
    peak = memory(broker.proc.pid)["VmHWM"]
    print(f"RSS at start {start / MiB:.1f} MiB, peak with 1,000,000 queued {peak / MiB:.1f} MiB")
    assert peak < start + 32 * MiB + 20 * MiB + 24 * MiB, (start, peak)
    broker.proc.wait_for_line(r"queues: the memory budget is spent \(-memory-max 33554432 bytes", stderr=True)
    got = asyncio.run(drain_in_order(broker.endpoint, 1_000_000))
    assert got == list(range(1_000_000)), "not every message once, in order"
    line = broker.proc.wait_for_line(r"queues: every paged-out message is read back \((\d+) paged out", stderr=True)
    assert int(line.group(1)) > 500_000, line.group(0)        # most of them were paged out

    async def settle() -> int:
        rss = memory(broker.proc.pid)["VmRSS"]
        for _ in range(50):                 # the broker gives memory back at its next ticks
            if rss < start + 24 * MiB:
                break
            await asyncio.sleep(0.1)
            rss = memory(broker.proc.pid)["VmRSS"]
        return rss

    after = asyncio.run(settle())
    print(f"RSS after the drain {after / MiB:.1f} MiB")
    assert after < start + 24 * MiB, (start, after)
    assert broker.proc.terminate() == 0


def test_paged_out_messages_survive_sigkill_and_come_back_in_order(procs: ProcGroup, tmp_path: Path) -> None:
    """300,000 queued with a 1 MiB budget (nearly all paged out), 100 of them delivered and held
    unanswered; SIGKILL; restarted with the same budget, the broker restores them paged out and
    delivers all 300,000 in order."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-memory-max", "1MiB", data_dir=d)
    asyncio.run(publish_numbered(broker.endpoint, 0, 300_000))

    async def hold_100() -> None:
        held: list[bytes] = []
        never = asyncio.Event()

        async def handler(data: bytes) -> None:
            held.append(bytes(data))
            await never.wait()

        async with Consumer(broker.endpoint, handler, prefetch=100, timeout=0.1):
            while len(held) < 100:
                await asyncio.sleep(0.02)
            assert broker.proc.kill9() == -signal.SIGKILL

    asyncio.run(hold_100())
    again = procs.broker("-nomsg", "-noweb", "-memory-max", "1MiB", data_dir=d)
    line = again.proc.wait_for_line(r"storage: .* 300000 messages restored \((\d+) of them paged out", stderr=True)
    assert int(line.group(1)) > 250_000, line.group(0)
    got = asyncio.run(drain_in_order(again.endpoint, 300_000))
    assert got == list(range(300_000)), "not every message once, in order"
    assert again.proc.terminate() == 0


def test_answers_to_paged_out_requests_reach_their_producer(procs: ProcGroup, tmp_path: Path) -> None:
    """20,000 requests of 1 KiB wait with no consumer and a 1 MiB budget (most paged out); a
    consumer comes and answers each; the producer gets every answer, each to its request."""
    broker = procs.broker("-nomsg", "-noweb", "-memory-max", "1MiB", "-stat", "-stat-interval", "0.2",
                          data_dir=tmp_path / "data")

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            futs = [asyncio.ensure_future(p.request(b"%06d" % i + b"." * 1018)) for i in range(20_000)]
            await asyncio.to_thread(broker.proc.wait_for_line, r"stat:.* queue=20000 ")
            await asyncio.to_thread(broker.proc.wait_for_line, r"queues: the memory budget is spent", stderr=True)

            def handler(data: bytes) -> bytes:
                return b"re:" + bytes(data[:6])

            async with Consumer(broker.endpoint, handler, timeout=HANG):
                answers = await asyncio.gather(*futs)
        assert answers == [b"re:%06d" % i for i in range(20_000)]

    asyncio.run(main())
    line = broker.proc.wait_for_line(r"queues: every paged-out message is read back \((\d+) paged out", stderr=True)
    assert int(line.group(1)) > 15_000, line.group(0)
    assert broker.proc.terminate() == 0
