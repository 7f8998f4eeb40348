"""Per-queue limits (docs/storage.md, "Limits"): a command's ``max_messages`` and ``max_bytes``
(its -schema entry) and the broker's -queue-max-bytes bound what waits; past them a SEND is
refused with QUEUE_FULL (the client's QueueFull, retryable), logged by the broker, and the
other queues go on. Real CLI brokers, teomq clients; every message accounted for.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from procs import ProcGroup
from teomq.client import Consumer, Producer
from teomq.errors import QueueFull

pytestmark = pytest.mark.integration

HANG = 60.0


async def publish_each(p: Producer, messages: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Publish and await each; (confirmed, refused with QueueFull)."""
    confirmed: list[bytes] = []
    refused: list[bytes] = []
    confs = [(m, p.publish(m)) for m in messages]
    for m, c in confs:
        try:
            await asyncio.wait_for(c, HANG)
            confirmed.append(m)
        except QueueFull:
            refused.append(m)
    return confirmed, refused


async def take(spec: str, command: str | None, n: int) -> list[bytes]:
    got: list[bytes] = []

    def handler(data: bytes) -> None:
        got.append(bytes(data))

    async with Consumer(spec, handler, timeout=HANG) as c:
        if command is not None:
            await c.subscribe(command)
        deadline = asyncio.get_running_loop().time() + HANG
        while len(got) < n and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    return got


def test_a_commands_limits_refuse_past_them_and_the_others_go_on(procs: ProcGroup, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"commands": [
        {"name": "jobs", "routing": "queue", "max_messages": 100},
        {"name": "big", "routing": "queue", "max_bytes": 10_000},
        {"name": "free", "routing": "queue"},
    ]}))
    broker = procs.broker("-nomsg", "-noweb", "-schema", str(schema), data_dir=tmp_path / "data")

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            ok, no = await publish_each(p, [b"jobs/%d" % i for i in range(150)])
            assert ok == [b"jobs/%d" % i for i in range(100)] and len(no) == 50
            ok, no = await publish_each(p, [b"big/" + b"%04d" % i + b"." * 992 for i in range(15)])
            assert len(ok) == 10 and len(no) == 5, (len(ok), len(no))     # 1,000 bytes each
            ok, no = await publish_each(p, [b"free/%d" % i for i in range(500)])
            assert len(ok) == 500 and not no                              # no limit: not held up
            got = await take(broker.endpoint, "jobs", 100)
            assert got == [b"jobs/%d" % i for i in range(100)]
            ok, no = await publish_each(p, [b"jobs/again%d" % i for i in range(100)])
            assert len(ok) == 100 and not no                              # room again
            err = None
            try:
                await p.publish(b"jobs/one more")
            except QueueFull as e:
                err = e
            assert err is not None and "'jobs' is at its limit" in str(err), err
            got = await take(broker.endpoint, "big", 10)
            assert len(got) == 10
            await p.publish(b"big/" + b"x" * 896)          # 900 bytes waiting
            await p.publish(b"big/" + b"y" * 196)          # 1,100: room
            for _ in range(8):
                await p.publish(b"big/" + b"z" * 996)       # 9,100
            err = None
            try:
                await p.publish(b"big/" + b"w" * 996)      # 10,100 would pass max_bytes 10,000
            except QueueFull as e:
                err = e
            # the reason names the queue's limit, not -queue-max-bytes (found in review)
            assert err is not None and "'big' is at its limit" in str(err), err

    asyncio.run(main())
    broker.proc.wait_for_line(r"50 messages refused: 'jobs' is at its limit \(max_messages 100\)", stderr=True)
    broker.proc.wait_for_line(r"messages? refused: 'big' is at its limit \(max_bytes 10000\)", stderr=True)
    assert broker.proc.terminate() == 0


def test_queue_max_bytes_bounds_the_basic_queue(procs: ProcGroup, tmp_path: Path) -> None:
    broker = procs.broker("-nomsg", "-noweb", "-queue-max-bytes", "50000", data_dir=tmp_path / "data")

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            ok, no = await publish_each(p, [b"%04d" % i + b"." * 996 for i in range(60)])
            assert len(ok) == 50 and len(no) == 10, (len(ok), len(no))
            got = await take(broker.endpoint, None, 50)
            assert got == ok
            ok2, no2 = await publish_each(p, [b"b%03d" % i + b"." * 996 for i in range(50)])
            assert len(ok2) == 50 and not no2

    asyncio.run(main())
    broker.proc.wait_for_line(r"10 messages refused: 'the queue' is at its limit \(-queue-max-bytes 50000\)",
                              stderr=True)
    assert broker.proc.terminate() == 0
