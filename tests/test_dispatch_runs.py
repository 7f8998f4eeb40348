"""Which consumer gets a message: runs bounded by free credit, against a real CLI broker.

The rule (docs/protocol.md, "Which consumer gets a message"): the consumer at the head of a
queue's ready ring takes a run of consecutive messages, at most min(its free credit when the
run begins, ``-dispatch-run``), then goes to the back while it has credit. So within any
window of N x run messages, N consumers with credit to spare each get one run; a consumer with
little free credit gets short runs, one without credit none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import teomq
from procs import ProcGroup
from waiting import until

pytestmark = pytest.mark.integration

LONG = 60.0


class Holder:
    """Handlers that record what each consumer got and answer only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: dict[str, list[int]] = {}

    def handler(self, name: str) -> Callable[[bytes], Any]:
        self.seen[name] = []

        async def handle(data: bytes) -> bytes:
            self.seen[name].append(int(data))
            await self.release.wait()
            return name.encode()
        return handle


async def consumers(endpoint: str, holder: Holder, prefetch: dict[str, int]) -> list[teomq.Consumer]:
    out = []
    for name, credit in prefetch.items():  # one after the other: the ready ring has them in this order
        c = teomq.Consumer(endpoint, holder.handler(name), name=name, prefetch=credit)
        await c.start()
        out.append(c)
    return out


async def send_and_release(endpoint: str, holder: Holder, n: int) -> list[bytes]:
    async with teomq.Producer(endpoint, timeout=LONG) as producer:
        tasks = [asyncio.ensure_future(producer.request(str(i))) for i in range(n)]
        await until(lambda: sum(map(len, holder.seen.values())) == n, f"{n} deliveries")
        holder.release.set()
        return await asyncio.gather(*tasks)


def runs(seen: list[int]) -> list[tuple[int, int]]:
    """A consumer's messages as runs of consecutive numbers: (first, length) each."""
    out: list[tuple[int, int]] = []
    for i in seen:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


@pytest.mark.parametrize("run", [None, "5"])
def test_messages_spread_in_runs_within_the_window(procs: ProcGroup, run: str | None) -> None:
    broker = procs.broker("-nomsg", "-noweb", *(["-dispatch-run", run] if run else []))
    size = int(run or 16)  # the default run is 16
    n, names = 300, ["a", "b", "c", "d"]

    async def main() -> None:
        holder = Holder()
        cs = await consumers(broker.endpoint, holder, {name: 1000 for name in names})
        answers = await send_and_release(broker.endpoint, holder, n)
        # every message once, answered by the consumer that got it
        owner = {i: name for name, got in holder.seen.items() for i in got}
        assert sorted(owner) == list(range(n))
        assert answers == [owner[i].encode() for i in range(n)]
        # runs of `size`, the consumers in turn; so every window of 4 x size messages reaches all four
        for k, name in enumerate(names):
            expected = [i for i in range(n) if i // size % len(names) == k]
            assert holder.seen[name] == expected, (name, runs(holder.seen[name]))
        for start in range(0, n - len(names) * size + 1):
            window = {owner[i] for i in range(start, start + len(names) * size)}
            assert window == set(names), start
        for c in cs:
            await c.close()

    asyncio.run(main())


def test_runs_are_bounded_by_free_credit(procs: ProcGroup) -> None:
    # Holding consumers of prefetch 3, 64 and 0 free (a stuck one that holds 2 of 2): each run
    # is at most its free credit, a consumer without credit gets none, nothing waits for it.
    broker = procs.broker("-nomsg", "-noweb")

    async def main() -> None:
        holder = Holder()
        stuck_release = asyncio.Event()
        stuck_seen: list[int] = []

        async def stuck(data: bytes) -> bytes:
            stuck_seen.append(int(data))
            await stuck_release.wait()
            return b"stuck"

        cs = await consumers(broker.endpoint, holder, {"small": 3, "big": 64})
        cs.append(teomq.Consumer(broker.endpoint, stuck, name="stuck", prefetch=2))
        await cs[-1].start()
        async with teomq.Producer(broker.endpoint, timeout=LONG) as producer:
            first = [asyncio.ensure_future(producer.request(f"{i}")) for i in range(2)]
            # ring: small, big, stuck; small takes 0-1 (its run is min(3, 16) = 3, cut by the burst)
            await until(lambda: len(holder.seen["small"]) == 2, "2 deliveries to small")
            more = [asyncio.ensure_future(producer.request(f"{i}")) for i in range(2, 60)]
            await until(lambda: sum(map(len, holder.seen.values())) + len(stuck_seen) == 60, "60 deliveries")
            # small: 3 in all (its credit), then no more; stuck: its 2; big: the rest, in runs of 16
            assert holder.seen["small"] == [0, 1, 2]
            assert stuck_seen == list(range(19, 21))
            assert holder.seen["big"] == list(range(3, 19)) + list(range(21, 60))
            holder.release.set()
            stuck_release.set()
            await asyncio.gather(*first, *more)
        for c in cs:
            await c.close()

    asyncio.run(main())


def test_answering_consumers_all_take_part(procs: ProcGroup) -> None:
    # Consumers that answer at once, bursts of 50: answers give credit back without moving
    # anyone in the ring, and a run goes on into the next burst (prefetch 1000: credit to spare).
    broker = procs.broker("-nomsg", "-noweb")
    got: dict[str, list[int]] = {n: [] for n in ("a", "b", "c")}

    def echo(name: str) -> Callable[[bytes], bytes]:
        def handle(data: bytes) -> bytes:
            got[name].append(int(data))
            return data
        return handle

    async def main() -> None:
        cs = []
        for name in got:
            c = teomq.Consumer(broker.endpoint, echo(name), name=name, prefetch=1000)
            await c.start()
            cs.append(c)
        async with teomq.Producer(broker.endpoint, timeout=LONG) as producer:
            for burst in range(20):
                answers = await asyncio.gather(*(producer.request(str(burst * 50 + i)) for i in range(50)))
                assert answers == [str(burst * 50 + i).encode() for i in range(50)]
        assert sorted(i for v in got.values() for i in v) == list(range(1000))
        for k, (name, seen) in enumerate(got.items()):
            assert seen == [i for i in range(1000) if i // 16 % 3 == k], (name, runs(seen))
        for c in cs:
            await c.close()

    asyncio.run(main())
