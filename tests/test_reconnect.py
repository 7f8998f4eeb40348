"""Clients ride through broker restarts (docs/semantics.md, "Reconnecting"): the library's
Client reconnects by itself (jittered backoff, the same session, its subscriptions made again),
buffers publish()es and holds request()s while it does; `teomq producer` and `teomq consumer`
keep running through a broker killed (SIGKILL) or stopped (SIGTERM) and restarted on the same
data directory and port, and say so in one line each way. Real CLI brokers over real sockets.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from procs import BrokerProc, ProcGroup
from teomq.client import Consumer, Producer
from teomq.errors import ConnectionLost, QueueFull, Reconnecting

pytestmark = pytest.mark.integration

HANG = 120.0
ANSWER_RE = re.compile(r"got answer: Answer to Hello wold #(\d+)!$")


def restart(procs: ProcGroup, old: BrokerProc, data: Path, how: int, *extra: str) -> BrokerProc:
    """Stop ``old`` (SIGKILL or SIGTERM) and start a broker on its data directory and port."""
    if how == signal.SIGKILL:
        assert old.proc.kill9() == -signal.SIGKILL
    else:
        assert old.proc.terminate() == 0
    new = procs.broker("-listen", f":{old.port}", *extra, data_dir=data)
    assert (new.address, new.port) == (old.address, old.port)
    return new


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_cli_producer_and_consumers_ride_through_two_broker_restarts(procs: ProcGroup, tmp_path: Path,
                                                                    how: int) -> None:
    """Broker, two consumers and `teomq producer -count 5000 -delay 1000 -timeout 30`; the
    broker is stopped and restarted on the same data directory and port twice during the run.
    The producer exits 0 with every message answered exactly once at the caller (requests in
    flight at a loss are sent again once it is back); the consumers reconnect by themselves.
    Nobody is touched by hand."""
    data = tmp_path / "data"
    broker = procs.broker("-nomsg", data_dir=data)
    # the address alone, from the local address book, as the README has it: a broker that stops
    # (SIGTERM) removes its entry, and the clients still find it where it was (found in the
    # README's run)
    spec = broker.address
    consumers = [procs.start("consumer", "-broker", spec, "-name", f"c{i}", "-nomsg", label=f"c{i}")
                 for i in range(2)]
    count = 5000
    producer = procs.start("producer", "-broker", spec, "-count", str(count), "-delay", "1000", "-timeout", "30",
                           label="producer")
    for k in (1, 2):
        producer.wait_for_count(ANSWER_RE, k * count // 3, timeout=HANG)
        broker = restart(procs, broker, data, how, "-nomsg")
    assert producer.wait(timeout=HANG) == 0, producer.describe()
    numbers = Counter(int(m.group(1)) for line in producer.lines if (m := ANSWER_RE.search(line)))
    assert sorted(numbers) == list(range(1, count + 1)), "not every message answered"
    assert max(numbers.values()) == 1, [n for n, c in numbers.items() if c > 1][:10]
    assert re.search(rf"done: sent {count}, answered {count}, errors 0", producer.lines[-1]), producer.describe()
    # one line when the connection is lost and one when it is back, each time
    assert sum("reconnecting" in line for line in producer.err_lines) == 2, producer.describe()
    assert sum("connected to broker" in line and "again" in line for line in producer.err_lines) == 2
    for c in consumers:
        assert c.alive, c.describe()
        assert sum("again" in line for line in c.err_lines) == 2, c.describe()
    # the consumers serve the restarted broker: a new producer's requests are answered
    late = procs.start("producer", "-broker", spec, "-count", "20", "-delay", "0", "-nomsg", label="late")
    assert late.wait(timeout=HANG) == 0, late.describe()
    for c in consumers:
        c.popen.send_signal(signal.SIGINT)
        assert c.wait(timeout=60) == 0, c.describe()


def test_a_consumer_with_reconnect_false_exits_when_the_broker_goes(procs: ProcGroup) -> None:
    broker = procs.broker("-nomsg")
    c = procs.start("consumer", "-broker", broker.endpoint, "-reconnect=false", "-nomsg", label="c")
    c.wait_for_line("connected to broker", stderr=True)
    assert broker.proc.kill9() == -signal.SIGKILL
    assert c.wait(timeout=60) == 1
    assert not any("reconnecting" in line for line in c.err_lines), c.describe()


def test_a_library_client_buffers_publishes_holds_requests_and_subscribes_again(
        procs: ProcGroup, tmp_path: Path) -> None:
    """A Consumer of command `a` and a Producer across a SIGKILL and restart: publish()es made
    while the broker is down are kept and delivered after it is back (their Confirmations
    resolve); a request() made while it is down waits and is answered; the consumer's
    subscription is made again without a call; send() raises Reconnecting meanwhile."""
    data = tmp_path / "data"
    args = ("-nomsg", "-command", "a:queue")
    broker = procs.broker(*args, data_dir=data)
    got: list[bytes] = []
    events: list[tuple[str, bool]] = []

    async def main() -> None:
        nonlocal broker

        def handler(data: bytes) -> bytes:
            got.append(bytes(data))
            return b"done " + bytes(data)

        async with Consumer(broker.endpoint, handler, prefetch=16, timeout=10,
                            on_connection=lambda up, _: events.append(("consumer", up))) as c, \
                Producer(broker.endpoint, timeout=30,
                         on_connection=lambda up, _: events.append(("producer", up))) as p:
            await c.subscribe("a")
            assert await p.request(b"a/before") == b"done a/before"
            await asyncio.to_thread(lambda: broker.proc.kill9())
            deadline = time.monotonic() + HANG
            while not (p.reconnecting and c.reconnecting):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            confirmations = [p.publish(b"a/while-down-%d" % i) for i in range(100)]
            assert p.buffered == 100 and p.unconfirmed == 100
            asked = asyncio.ensure_future(p.request(b"a/asked-while-down"))
            with pytest.raises(Reconnecting):
                p.send(b"a/x", lambda *_: None)
            await asyncio.sleep(1.0)        # (the client keeps trying; the broker is down)
            assert not asked.done()
            broker = await asyncio.to_thread(lambda: procs.broker("-listen", f":{broker.port}", *args,
                                                                  data_dir=data))
            assert await asked == b"done a/asked-while-down"
            for conf in confirmations:
                await conf
            assert p.buffered == 0
            await p.confirmed(0)
            deadline = time.monotonic() + HANG
            while sum(1 for g in got if g.startswith(b"a/while-down-")) < 100:
                assert time.monotonic() < deadline, f"{len(got)} delivered"
                await asyncio.sleep(0.05)
            assert c.subscriptions == ["a"] and c.connected and p.connected

    asyncio.run(main())
    assert [g for g in got if g.startswith(b"a/while-down-")] == [b"a/while-down-%d" % i for i in range(100)]
    assert sorted(events) == sorted([("consumer", False), ("consumer", True), ("producer", False), ("producer", True)])
    assert broker.proc.terminate() == 0


def test_bounds_giving_up_and_close_while_reconnecting(procs: ProcGroup) -> None:
    """Past publish_buffer, publish() raises QueueFull; close() while reconnecting fails what
    waited (ConnectionLost) and ends wait_closed(); reconnect_tries gives up (wait_closed raises);
    reconnect=False fails requests at once with ConnectionLost."""
    broker = procs.broker("-nomsg")

    async def main() -> None:
        p = Producer(broker.endpoint, timeout=5, publish_buffer=3)
        q = Producer(broker.endpoint, timeout=5, reconnect_tries=2, reconnect_delay=0.05, reconnect_max_delay=0.1)
        r = Producer(broker.endpoint, timeout=5, reconnect=False)
        for client in (p, q, r):
            await client.connect()
        await asyncio.to_thread(lambda: broker.proc.kill9())
        deadline = time.monotonic() + HANG
        while not (p.reconnecting and not r.connected):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        kept = [p.publish(b"x") for _ in range(3)]
        with pytest.raises(QueueFull, match="publish_buffer"):
            p.publish(b"x")
        waiting = asyncio.ensure_future(p.request(b"y"))
        ended = asyncio.ensure_future(p.wait_closed())
        await asyncio.sleep(0.3)
        assert not waiting.done() and not ended.done()
        await p.close()
        assert not p.reconnecting
        await asyncio.wait_for(ended, 10)
        with pytest.raises(ConnectionLost, match="closed while reconnecting"):
            await waiting
        for conf in kept:
            with pytest.raises(ConnectionLost):
                await conf
        with pytest.raises(ConnectionLost, match="gave up reconnecting .* after 2 tries"):
            await asyncio.wait_for(q.wait_closed(), 30)
        assert not q.reconnecting
        with pytest.raises(ConnectionLost):
            await r.request(b"z")
        with pytest.raises(ConnectionLost):
            await r.wait_closed()
        for client in (q, r):
            await client.close()

    asyncio.run(main())
