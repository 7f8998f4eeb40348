"""Graceful shutdown (docs/storage.md, "Stopping"): SIGTERM or SIGINT stops taking messages and
making deliveries, waits (up to -shutdown-timeout) for the answers to what consumers hold,
syncs and exits 0, saying how many messages stay queued on disk; a restarted broker delivers
every one of them. Ctrl+C on a consumer gives its unanswered messages back to the queue.

Real CLI processes and real signals; the clients are teomq's, in the test's process. Waits are
hang guards.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from pathlib import Path

import pytest

from procs import ProcGroup
from teomq.client import Consumer, Producer

pytestmark = pytest.mark.integration

HANG = 60.0


async def wait_for(pred, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + HANG
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


async def publish_confirmed(spec: str, prefix: str, count: int) -> list[bytes]:
    sent = []
    async with Producer(spec, timeout=HANG, reconnect=False) as p:
        for i in range(count):
            m = f"{prefix}-{i}".encode()
            p.publish(m)
            sent.append(m)
            if i % 256 == 255:
                await p.confirmed(0)
        await p.confirmed(0)
    return sent


async def drain_all(spec: str, expect: int) -> list[bytes]:
    got: list[bytes] = []

    def handler(data: bytes) -> bytes:
        got.append(bytes(data))
        return b"ok"

    async with Consumer(spec, handler, timeout=HANG, reconnect=False):
        await wait_for(lambda: len(got) >= expect, f"{expect} messages")
        await asyncio.sleep(0.5)        # nothing more comes
    return got


def test_sigterm_with_messages_queued_and_in_flight_loses_none(procs: ProcGroup, tmp_path: Path) -> None:
    """5,000 confirmed messages queued; a consumer holds 16 of them and never answers. SIGTERM:
    the broker waits its -shutdown-timeout (1 s) for those answers, gives them back to the
    queue, exits 0 and logs that all 5,000 stay queued on disk; restarted, it delivers every
    one of them, each once."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-shutdown-timeout", "1", data_dir=d)
    sent: list[bytes] = []
    held: list[bytes] = []

    async def main() -> None:
        sent.extend(await publish_confirmed(broker.endpoint, "m", 5000))
        never = asyncio.Event()

        async def handler(data: bytes) -> bytes:
            held.append(bytes(data))
            await never.wait()
            return b"never"

        async with Consumer(broker.endpoint, handler, prefetch=16, timeout=0.1, reconnect=False):
            await wait_for(lambda: len(held) == 16, "16 messages in flight")
            broker.proc.popen.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(broker.proc.wait) == 0, broker.proc.describe()

    asyncio.run(main())
    err = "\n".join(broker.proc.err_lines)
    assert "waiting up to 1 s for the answers to 16 messages in flight" in err, broker.proc.describe()
    assert "0 of 16 messages in flight answered; 16 still in flight go back to their queues" in err, err
    assert "5000 messages stay queued on disk" in err, err
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    again.proc.wait_for_line(r"storage: .* 5000 messages restored", stderr=True)
    got = asyncio.run(drain_all(again.endpoint, 5000))
    assert collections.Counter(got) == collections.Counter(sent), "not every message once"
    assert set(held) <= set(got)
    assert again.proc.terminate() == 0


def test_sigterm_waits_for_answers_in_flight_and_relays_them(procs: ProcGroup, tmp_path: Path) -> None:
    """A producer's 200 requests; a consumer works 1 s on each, 8 at a time. SIGTERM: no new
    delivery is made, the 8 in flight are answered and their answers reach the producer, the
    broker exits 0; the rest are delivered after a restart."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)
    answers: list[bytes] = []
    received: list[bytes] = []
    at_signal: list[int] = []

    async def main() -> None:
        async def handler(data: bytes) -> bytes:
            received.append(bytes(data))
            await asyncio.sleep(1.0)
            return b"re:" + data

        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p, \
                Consumer(broker.endpoint, handler, prefetch=8, timeout=HANG, reconnect=False):

            async def ask(i: int) -> None:
                try:
                    answers.append(await p.request(f"q{i}".encode()))
                except Exception:  # noqa: BLE001 - the connection closes with the broker
                    pass

            tasks = [asyncio.create_task(ask(i)) for i in range(200)]
            await wait_for(lambda: len(received) >= 20, "20 deliveries")
            await wait_for(lambda: len(received) % 8 == 0 and len(answers) == len(received) - 8, "a full window")
            at_signal.append(len(received))
            broker.proc.popen.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(broker.proc.wait) == 0, broker.proc.describe()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    err = "\n".join(broker.proc.err_lines)
    assert "8 of 8 messages in flight answered; 0 still in flight" in err, broker.proc.describe()
    assert len(received) == at_signal[0], "a delivery was made after SIGTERM"
    assert sorted(answers) == sorted(b"re:" + m for m in received), "an answer in flight did not reach the producer"
    left = 200 - len(received)
    assert f"{left} messages stay queued on disk" in err, err
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = asyncio.run(drain_all(again.endpoint, left))
    assert sorted(got + received) == sorted(f"q{i}".encode() for i in range(200))
    assert again.proc.terminate() == 0


def test_sigint_on_a_consumer_gives_back_its_unanswered_messages(procs: ProcGroup, tmp_path: Path) -> None:
    """`teomq consumer -work-ms 60000` holds its prefetch of requests without answering; Ctrl+C
    (SIGINT) ends it with exit 0, and another consumer gets and answers every one of them: the
    producer gets all its answers."""
    broker = procs.broker("-nomsg", "-noweb", data_dir=tmp_path / "data")
    slow = procs.start("consumer", "-broker", broker.endpoint, "-work-ms", "60000", "-prefetch", "10",
                       "-name", "slow", label="slow")
    answers: list[bytes] = []

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            futs = [asyncio.ensure_future(p.request(f"r{i}".encode())) for i in range(30)]
            await asyncio.to_thread(slow.wait_for_count, r"slow got message: r\d+", 10)
            slow.popen.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(slow.wait) == 0, slow.describe()

            def handler(data: bytes) -> bytes:
                return b"Answer to " + data

            async with Consumer(broker.endpoint, handler, timeout=HANG, reconnect=False):
                answers.extend(await asyncio.gather(*futs))

    asyncio.run(main())
    assert sorted(answers) == sorted(f"Answer to r{i}".encode() for i in range(30))
    assert slow.count_lines(r"slow got message") == 10, slow.describe()
    assert broker.proc.terminate() == 0
