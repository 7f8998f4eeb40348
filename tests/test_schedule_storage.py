"""Delays, priorities and time to live on the durable log (docs/semantics.md, docs/storage.md):
delayed messages past the memory budget stay on disk (only their heap entries in memory) and
come back after a SIGKILL with what is left of their delay; compaction copies a delayed or
expiring message forward with its times. Real CLI brokers; memory from /proc.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from test_storage_compaction import Sampler, publish_answered
from test_storage_memory import memory

from procs import ProcGroup
from teomq._py.seglog import REC_TIMES, TIME_EXPIRES, TIME_NOT_BEFORE, read_segment
from teomq.client import Consumer, DeliveryContext, Producer
from teomq.errors import DeadLettered, Retry

pytestmark = pytest.mark.integration

HANG = 120.0
MiB = 1 << 20
EARLY = 0.005   # a delay's wall-clock rounding (ms) across a restart


def stats(web_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/stats", timeout=30) as r:
        return json.loads(r.read())["broker"]


async def take(spec: str, count: int, command: str | None = None, *, settle: float = 0.5,
               limit: float = HANG) -> list[tuple[bytes, float]]:
    """(payload, wall-clock time received) of ``count`` deliveries; then ``settle`` s more."""
    got: list[tuple[bytes, float]] = []

    def handler(data: bytes) -> None:
        got.append((bytes(data), time.time()))

    async with Consumer(spec, handler, prefetch=256, timeout=HANG) as c:
        if command:
            await c.subscribe(command)
        deadline = time.monotonic() + limit
        while len(got) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count} delivered"
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle)
    return got


def test_delayed_messages_past_the_memory_budget_stay_on_disk_and_survive_a_sigkill(
        procs: ProcGroup, tmp_path: Path) -> None:
    """50,000 delayed 1 KiB messages with -memory-max 1MiB: at most the budget is held in
    payloads (the rest on disk, 96 bytes of heap entry each in memory); SIGKILL before they are
    due; restarted, the broker delivers every one, none before its time, each level in order."""
    d = tmp_path / "data"
    args = ("-nomsg", "-memory-max", "1MiB")
    broker = procs.broker(*args, data_dir=d)
    start = memory(broker.proc.pid)["VmRSS"]
    n = 50_000
    delay = 8.0

    sent_at: list[float] = []   # each message's wall-clock time of publish: none due before + delay

    async def publish() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            for i in range(n):
                sent_at.append(time.time())
                p.publish(b"%06d" % i + b"x" * 1018, delay=delay, priority=3 if i % 10 == 0 else 0)
                if i % 1024 == 1023:
                    await p.confirmed(4096)
            await p.confirmed(0)

    asyncio.run(publish())
    sent = sent_at[0]
    peak = memory(broker.proc.pid)["VmHWM"]
    print(f"RSS at start {start / MiB:.1f} MiB, peak with {n} delayed 1 KiB messages {peak / MiB:.1f} MiB")
    # in memory they would take 52 MB of payload; paged out, 4.8 MB of heap entries
    assert peak < start + 1 * MiB + 5 * MiB + 24 * MiB, (start, peak)
    assert broker.proc.kill9() == -signal.SIGKILL
    assert time.time() < sent + delay, "too slow to kill the broker before the delay ran out"
    again = procs.broker(*args, data_dir=d)
    again.proc.wait_for_line(rf"storage: .* {n} messages restored", stderr=True)
    got = asyncio.run(take(again.endpoint, n))
    assert len(got) == n
    early = [p for p, at in got if at < sent_at[int(p[:6])] + delay - EARLY]
    assert early == [], f"{len(early)} delivered before their time"
    numbers = [int(p[:6]) for p, _ in got]
    assert sorted(numbers) == list(range(n)), "not every message once"
    # each level in order (a level's messages, delayed alike, are due in the order they came)
    high = [i for i in numbers if i % 10 == 0]
    low = [i for i in numbers if i % 10]
    assert high == sorted(high) and low == sorted(low), "a level out of order"
    assert again.proc.terminate() == 0


def test_delayed_messages_due_behind_paged_out_ones_of_their_level_keep_their_turn(
        procs: ProcGroup, tmp_path: Path) -> None:
    """With -memory-max 1MiB, 2,000 1 KiB messages delayed 6 s (the first ~1,000 held in
    memory, the rest on disk), then 2,000 delayed 3 s (on disk): when the first batch falls due
    the second's are waiting paged out, ahead of it. The consumer, connected after both, gets
    the 3 s ones first and then the 6 s ones, each in the order sent (a level is FIFO by the
    time its messages joined it, in memory or not)."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-memory-max", "1MiB", data_dir=d)
    n = 2000

    async def publish() -> float:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            sent = time.time()
            for i in range(n):
                p.publish(b"late-%05d" % i + b"x" * 1014, delay=6.0)
            for i in range(n):
                p.publish(b"soon-%05d" % i + b"x" * 1014, delay=3.0)
            await p.confirmed(0)
            return sent

    sent = asyncio.run(publish())
    assert stats(broker.web_port)["delayed_paged_out"] > 0, "nothing was paged out: no test"
    wait = sent + 6.5 - time.time()
    if wait > 0:
        time.sleep(wait)           # both batches are due: they wait for a consumer
    got = asyncio.run(take(broker.endpoint, 2 * n))
    names = [p[:10] for p, _ in got]
    assert names == [b"soon-%05d" % i for i in range(n)] + [b"late-%05d" % i for i in range(n)]
    assert broker.proc.terminate() == 0


def test_a_delayed_fanout_message_due_behind_paged_out_ones_keeps_its_turn(procs: ProcGroup, tmp_path: Path) -> None:
    """A fanout command with no subscriber keeps its messages as a queue does: one delayed by
    2 s, then 3,000 1 KiB ones past -memory-max 1MiB (most paged out). The subscriber that comes
    after it fell due gets the 3,000 in order and then the delayed one: it joined the tail when
    due, behind the paged-out ones, not ahead of them."""
    broker = procs.broker("-nomsg", "-memory-max", "1MiB", "-command", "f:fanout", data_dir=tmp_path / "data")
    n = 3000

    async def publish() -> float:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            sent = time.time()
            p.publish(b"f/late" + b"x" * 1018, delay=2.0)
            for i in range(n):
                p.publish(b"f/%05d" % i + b"x" * 1017)
            await p.confirmed(0)
            return sent

    sent = asyncio.run(publish())
    assert stats(broker.web_port)["paged_out"] > 0, "nothing was paged out: no test"
    wait = sent + 2.5 - time.time()
    if wait > 0:
        time.sleep(wait)
    got = asyncio.run(take(broker.endpoint, n + 1, "f"))
    names = [p[2:7] for p, _ in got]
    assert names == [b"%05d" % i for i in range(n)] + [b"latex"]
    assert broker.proc.terminate() == 0


def test_a_retry_past_the_memory_budget_keeps_its_count_and_is_dead_lettered(procs: ProcGroup, tmp_path: Path) -> None:
    """-max-deliveries 3 with the memory budget spent (2,000 1 KiB messages of command `b`
    nobody takes): a message of `a` whose handler always raises Retry is delivered 3 times and
    dead-lettered (its producer gets DeadLettered). A retry is never paged out: its record does
    not hold its attempts, and read back it would count from 0 again (found in review: it
    looped)."""
    broker = procs.broker("-nomsg", "-memory-max", "1MiB", "-max-deliveries", "3", "-retry-base", "0.05",
                          "-retry-max", "0.1", "-command", "a:queue", "-command", "b:queue", data_dir=tmp_path / "data")
    attempts: list[int] = []

    async def main() -> None:
        def handler(data: bytes, ctx: DeliveryContext) -> None:
            attempts.append(ctx.attempt)
            raise Retry()

        async with Producer(broker.endpoint, timeout=HANG) as p, \
                Consumer(broker.endpoint, handler, timeout=HANG) as c:
            await c.subscribe("a")
            for i in range(2000):
                p.publish(b"b/%05d" % i + b"x" * 1017)
            await p.confirmed(0)
            with pytest.raises(DeadLettered):
                await p.request(b"a/poison", timeout=60)

    asyncio.run(main())
    assert attempts == [1, 2, 3]
    assert broker.proc.terminate() == 0


def test_compaction_copies_a_delayed_and_an_expiring_message_forward_with_their_times(
        procs: ProcGroup, tmp_path: Path) -> None:
    """Command `a` (no consumer) gets 10 messages delayed by 40 s and 10 with a 30 s ttl; 200,000
    of command `b` are answered behind them with 1 MiB segments, so compaction copies `a`'s
    forward and deletes the segments that had their first records (and their first time
    records). After a SIGKILL and a restart, the copies still have their times: the delayed
    ones come no earlier than their time, the expiring ones never (counted as expired)."""
    d = tmp_path / "data"
    args = ("-nomsg", "-segment-size", str(MiB), "-memory-max", "1MiB", "-command", "a:queue",
            "-command", "b:queue")
    broker = procs.broker(*args, data_dir=d)
    total = 200_000
    answered = 0
    delay, ttl = 40.0, 30.0

    async def main() -> float:
        nonlocal answered

        def answer(data: bytes) -> None:
            nonlocal answered
            answered += 1

        async with Producer(broker.endpoint, timeout=HANG) as p:
            sent = time.time()
            for i in range(10):
                p.publish(b"a/delayed-%d" % i, delay=delay)
                p.publish(b"a/expiring-%d" % i, ttl=ttl)
            await p.confirmed(0)
            first = sorted((d / "queues").glob("*.seg"))[0]
            async with Consumer(broker.endpoint, answer, prefetch=512, timeout=HANG) as c:
                await c.subscribe("b")
                await publish_answered(p, b"b/", range(total), lambda: answered, total, d / "queues")
            assert not first.exists(), "compaction did not empty the first segment"
            return sent

    with Sampler(d / "queues"):
        sent = asyncio.run(main())
    assert broker.proc.kill9() == -signal.SIGKILL
    # the time records of the copies are there (the first ones went with their segment); read
    # once the broker is gone (it deletes segments as it goes)
    times = [r for seg in sorted((d / "queues").glob("*.seg")) for b in read_segment(seg).batches if b.ok
             for r in b.records() if r.type == REC_TIMES]
    assert sum(1 for r in times if r.reason == TIME_NOT_BEFORE) >= 10
    assert sum(1 for r in times if r.reason == TIME_EXPIRES) >= 10
    assert time.time() < sent + ttl, "too slow: the ttl ran out before the restart"
    again = procs.broker(*args, data_dir=d)
    again.proc.wait_for_line(r"storage: .* 20 messages restored", stderr=True)
    wait = sent + ttl + 0.5 - time.time()
    if wait > 0:
        time.sleep(wait)          # the expiring ones' time is over
    got = asyncio.run(take(again.endpoint, 10, "a", settle=1.0, limit=delay + HANG))
    assert sorted(p for p, _ in got) == sorted(b"a/delayed-%d" % i for i in range(10))
    assert all(at >= sent + delay - EARLY for _, at in got), "a delayed copy came early"
    assert stats(again.web_port)["deadline_expired"] == 10
    assert again.proc.terminate() == 0
