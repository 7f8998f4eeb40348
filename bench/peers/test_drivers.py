"""The peer drivers of bench/peers/: behaviour, not speed.

Unit tests of the glue (Outbox, Pending) always run. Each driver's test starts its real private
server and is skipped where the server or the Python client is not installed
(``sh bench/peers/install.sh`` installs them): one producer and one consumer in this process do
rpc (every request answered, none lost), publish and drain (every message counted), and stop()
leaves no server process behind.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shutil
import sys
from typing import Any

import pytest

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from peers.outbox import Outbox, Pending

DRIVERS = [
    ("nats", "peers.nats_driver", "NatsDriver", "nats-server", "nats"),
    ("redis", "peers.redis_driver", "RedisDriver", "redis-server", "redis"),
    ("rabbitmq", "peers.rabbitmq_driver", "RabbitDriver", "/usr/lib/rabbitmq/bin/rabbitmq-server", "aio_pika"),
]


# -- glue -----------------------------------------------------------------------------------


def test_outbox_batches_and_flushes() -> None:
    async def main() -> list[list[int]]:
        batches: list[list[int]] = []

        async def send(items: list[int]) -> None:
            batches.append(items)
            await asyncio.sleep(0)

        box = Outbox(send)
        for i in range(5):
            box.put(i)
        await box.flushed()
        box.put(5)
        await box.flushed()
        await box.close()
        return batches

    assert asyncio.run(main()) == [[0, 1, 2, 3, 4], [5]]


def test_outbox_reports_a_failed_send() -> None:
    async def main() -> None:
        async def send(items: list[int]) -> None:
            raise ConnectionError("gone")

        box = Outbox(send)
        box.put(1)
        with pytest.raises(ConnectionError):
            await box.flushed()
        with pytest.raises(ConnectionError):
            box.put(2)
        await box.close()

    asyncio.run(main())


def test_pending_completes_once_and_times_out() -> None:
    async def main() -> list[Any]:
        seen: list[Any] = []
        p = Pending(timeout=0.05)
        p.add("a", lambda e: seen.append(("a", e)))
        p.add("b", lambda e: seen.append(("b", type(e))))
        p.complete("a")
        p.complete("a")  # a late duplicate: ignored
        await asyncio.sleep(0.2)  # two sweeps: "b" times out
        p.complete("b")
        assert len(p) == 0
        await p.close()
        return seen

    assert asyncio.run(main()) == [("a", None), ("b", TimeoutError)]


# -- real servers ---------------------------------------------------------------------------


def _driver(module: str, cls: str, binary: str, client: str) -> Any:
    if not (shutil.which(binary) or os.path.exists(binary)):
        pytest.skip(f"{binary} not installed (sh bench/peers/install.sh)")
    if importlib.util.find_spec(client) is None:
        pytest.skip(f"Python package {client} not installed (sh bench/peers/install.sh)")
    return getattr(importlib.import_module(module), cls)()


def _echo(data: bytes) -> bytes:
    return data


async def _exercise(driver: Any, url: str) -> None:
    n = 300
    # rpc: a closed loop of 16 in flight until n are answered
    consumer = await driver.consumer(url, 0, "rpc", "t.rpc", _echo)
    producer = await driver.producer(url, 0, "rpc", "t.rpc")
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    state = {"sent": 0, "ok": 0, "errors": []}

    def done(err: BaseException | None) -> None:
        if err is None:
            state["ok"] += 1
        else:
            state["errors"].append(err)
        if state["sent"] < n:
            state["sent"] += 1
            producer.request(b"x" * 100, done)
        elif state["ok"] + len(state["errors"]) == n and not finished.done():
            finished.set_result(None)

    for _ in range(16):
        state["sent"] += 1
        producer.request(b"x" * 100, done)
    await asyncio.wait_for(finished, 30)
    assert state["errors"] == [] and state["ok"] == n
    assert consumer.count == n
    await producer.close()
    await consumer.close()

    # publish: every message reaches the consumer
    consumer = await driver.consumer(url, 0, "publish", "t.pub", _echo)
    producer = await driver.producer(url, 0, "publish", "t.pub")
    for i in range(n):
        producer.publish(b"m%d" % i)
        if i % 32 == 31:
            await producer.writable()
    await producer.drain()
    for _ in range(300):
        if consumer.count >= n:
            break
        await asyncio.sleep(0.05)
    assert consumer.count == n
    await producer.close()
    await consumer.close()

    # drain: published with no consumer, accepted, then consumed
    await driver.purge(url, "t.drain")
    producer = await driver.producer(url, 0, "drain", "t.drain")
    for i in range(n):
        producer.publish(b"d%d" % i)
    await producer.drain()
    await producer.close()
    consumer = await driver.consumer(url, 0, "drain", "t.drain", _echo)
    for _ in range(300):
        if consumer.count >= n:
            break
        await asyncio.sleep(0.05)
    assert consumer.count == n
    await consumer.close()
    await driver.purge(url, "t.drain")


@pytest.mark.integration
@pytest.mark.parametrize("name,module,cls,binary,client", DRIVERS, ids=[d[0] for d in DRIVERS])
def test_driver_rpc_publish_drain(tmp_path: Any, name: str, module: str, cls: str, binary: str,
                                  client: str) -> None:
    driver = _driver(module, cls, binary, client)
    server = driver.start_server(str(tmp_path))
    try:
        assert server.url.split("//", 1)[1].split("@")[-1].startswith("127.0.0.1:")
        assert server.pid and os.path.exists(f"/proc/{server.pid}")
        asyncio.run(_exercise(driver, server.url))
    finally:
        server.stop()
    # stop() waited for the process it started (no zombie, no orphan left running)
    try:
        with open(f"/proc/{server.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")
    server.stop()  # a second stop() is harmless
