"""The broker as a library: teomq.Broker with teomq.Producer / teomq.Consumer in one process.

Everything talks over real TCP sockets on 127.0.0.1; every test runs on the stdlib loop and
on uvloop (``arun``). Waits poll with a generous deadline (a hang guard), never a timing
assertion.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import teomq
from teomq import ConnectionLost
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.protocol import DEFAULT_MAX_PAYLOAD, ErrorCode, FrameType
from waiting import until

pytestmark = pytest.mark.usefixtures("teomq_home")

LONG = 30.0  # request timeouts: far beyond anything these tests wait for


def make_broker(tmp_path: Path, **kw: Any) -> teomq.Broker:
    return teomq.Broker(port=0, data_dir=tmp_path / "broker", record_address=False, log_messages=False, **kw)


def spec(broker: teomq.Broker) -> str:
    return f"{broker.address}@127.0.0.1:{broker.port}"


def assert_idle(broker: teomq.Broker) -> None:
    s = broker.stats()
    assert (s["queue"], s["inflight"]) == (0, 0), s


def test_request_answer(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            async with teomq.Consumer(spec(broker), lambda d: b"Answer to " + d, name="c") as consumer, \
                    teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                assert producer.address == broker.address and consumer.address == broker.address
                assert await producer.request(b"Hello wold #1!") == b"Answer to Hello wold #1!"
                texts = [f"Hello wold #{n}!" for n in range(2, 102)]
                answers = await asyncio.gather(*(producer.request(t) for t in texts))
                assert answers == [f"Answer to {t}".encode() for t in texts]
                # fire and forget: delivered and answered, but no REPLY comes back
                producer.publish(b"no reply wanted")
                await until(lambda: consumer.stats["received"] == 102, "the published message delivered")
                await until(lambda: broker.stats()["inflight"] == 0, "its answer")
                s = broker.stats()
                assert (s["in"], s["out"], s["answered"], s["consumers"], s["connections"]) == (102, 102, 101, 1, 2)
                assert producer.stats["replies"] == 101 and producer.pending == 0
                assert_idle(broker)
            await until(lambda: broker.stats()["connections"] == 0, "both clients gone")
            assert broker.stats()["consumers"] == 0

    arun(main())


def test_queue_bound_holds_back_then_delivers(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path, queue_max=5) as broker:
            async with teomq.Producer(spec(broker), timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.request(f"m{n}")) for n in range(1, 9)]
                # one read of 8 SENDs: accepted up to the high mark (4 of 5), the rest of the
                # read parked in order, not refused, and the producer's reads paused
                await until(lambda: broker.stats()["backpressure"] == 1, "the high mark")
                await until(lambda: sum(c.parked_sends for c in broker._conns) == 4, "four parked")
                s = broker.stats()
                assert (s["queue"], s["in"], s["refused"]) == (4, 4, 0)
                assert not any(t.done() for t in tasks)
                # a consumer drains the queue: the parked ones are accepted in order, all answered
                async with teomq.Consumer(spec(broker), lambda d: d.upper(), name="late"):
                    answers = await asyncio.gather(*tasks)
                assert answers == [f"M{n}".encode() for n in range(1, 9)]
                assert producer.stats["refused"] == 0 and broker.stats()["refused"] == 0
                async with teomq.Consumer(spec(broker), lambda d: d.upper(), name="late2"):
                    assert await producer.request("m9") == b"M9"
            assert_idle(broker)

    arun(main())


def test_a_send_past_the_bound_is_refused(arun: Any, tmp_path: Path) -> None:
    # Only a connection that is not held back can meet the bound itself: a consumer (never held
    # back, its answers must flow) that also sends.
    async def main() -> None:
        async with make_broker(tmp_path, queue_max=2) as broker:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            hello = {"v": 1, "role": "consumer", "name": "c", "prefetch": 1, "nonce": os.urandom(16), "auth": None}
            writer.write(encode_frame(FrameType.HELLO, 0, 0, msgpack.packb(hello))
                         + b"".join(encode_frame(FrameType.SEND, 0, i, b"x") for i in range(1, 5)))
            decoder, frames = FrameDecoder(DEFAULT_MAX_PAYLOAD), []
            deadline = loop.time() + LONG
            while sum(f[0] == FrameType.ERROR for f in frames) < 2 and loop.time() < deadline:
                frames += decoder.feed(await asyncio.wait_for(reader.read(65536), LONG))
            errors = [msgpack.unpackb(f[3]) for f in frames if f[0] == FrameType.ERROR]
            assert [e["code"] for e in errors] == [ErrorCode.QUEUE_FULL] * 2
            assert broker.stats()["refused"] == 2 and broker.stats()["held"] == 2
            writer.close()

    arun(main())


def test_consumer_closing_with_inflight_messages_redelivers(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            never = asyncio.Event()

            async def stuck(data: bytes) -> bytes:
                await never.wait()
                return b"too late"

            # timeout=0.5: close() gives its running handlers half a second, then cancels them
            first = teomq.Consumer(spec(broker), stuck, name="first", prefetch=4, timeout=0.5)
            await first.start()
            async with teomq.Producer(spec(broker), timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.request(f"job {n}")) for n in range(10)]
                await until(lambda: first.stats["received"] == 4, "first holding its prefetch")
                await until(lambda: broker.stats()["in"] == 10, "all ten accepted")
                assert (broker.stats()["inflight"], broker.stats()["queue"]) == (4, 6)

                second = teomq.Consumer(spec(broker), lambda d: b"second: " + d, name="second")
                await second.start()
                await until(lambda: second.stats["received"] == 6, "second taking the queue")
                assert second.stats["redelivered"] == 0
                await first.close()  # leaves 4 deliveries unanswered
                answers = await asyncio.gather(*tasks)
                assert answers == [f"second: job {n}".encode() for n in range(10)]
                assert second.stats["redelivered"] == 4  # the DELIVERs carried REDELIVERED
                assert first.stats["answered"] == 0
                s = broker.stats()
                assert (s["redelivered"], s["answered"], s["out"]) == (4, 10, 14)
                await second.close()
            assert_idle(broker)

    arun(main())


def test_answer_for_a_departed_producer_is_orphaned(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            release = asyncio.Event()

            async def slow(data: bytes) -> bytes:
                await release.wait()
                return b"late answer to " + data

            async with teomq.Consumer(spec(broker), slow, name="slow") as consumer:
                producer = teomq.Producer(spec(broker), timeout=LONG)
                await producer.connect()
                tasks = [asyncio.ensure_future(producer.request(f"q{n}")) for n in range(3)]
                await until(lambda: consumer.stats["received"] == 3, "three deliveries")
                await producer.close()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(isinstance(r, ConnectionLost) for r in results), results
                await until(lambda: broker.stats()["connections"] == 1, "the producer's connection gone")
                assert broker.stats()["inflight"] == 3  # still held by the consumer
                release.set()
                await until(lambda: broker.stats()["orphaned"] == 3, "three orphaned answers")
                s = broker.stats()
                assert (s["answered"], s["inflight"], s["queue"], s["unknown_answers"]) == (0, 0, 0, 0)
                assert consumer.stats["answered"] == 3
            await until(lambda: broker.stats()["connections"] == 0, "the consumer gone")

    arun(main())


def runs_of(n: int, names: str, run: int) -> dict[str, list[bytes]]:
    """Messages 0..n-1 in turns of ``run`` over consumers with credit to spare, in ring order."""
    got: dict[str, list[bytes]] = {c: [] for c in names}
    for i in range(n):
        got[names[i // run % len(names)]].append(f"{i}".encode())
    return got


@pytest.mark.parametrize("run", [16, 1, 7])
def test_runs_over_three_consumers(arun: Any, tmp_path: Path, run: int) -> None:
    async def main() -> None:
        async with make_broker(tmp_path, dispatch_run=run) as broker:
            # holding consumers: the order of DELIVERs is the broker's choice alone
            release = asyncio.Event()
            seen: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}

            def holder(name: str) -> Callable[[bytes], Any]:
                async def handle(data: bytes) -> bytes:
                    seen[name].append(data)
                    await release.wait()
                    return name.encode()
                return handle

            consumers = [teomq.Consumer(spec(broker), holder(n), name=n, prefetch=64) for n in seen]
            for c in consumers:  # one after the other: the ready ring has them in this order
                await c.start()
            async with teomq.Producer(spec(broker), timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.request(f"{i}")) for i in range(100)]
                await until(lambda: sum(map(len, seen.values())) == 100, "100 deliveries")
                # runs of `run` consecutive messages, each consumer in turn (1: round robin)
                assert seen == runs_of(100, "abc", run)
                release.set()
                answers = await asyncio.gather(*tasks)
                owner = {d: n for n, v in seen.items() for d in v}
                assert answers == [owner[f"{i}".encode()].encode() for i in range(100)]
            for c in consumers:
                await c.close()

            # prefetch=1, answering at once: each consumer gets a fair share of 300
            counts = {"x": 0, "y": 0, "z": 0}

            def counter(name: str) -> Callable[[bytes], bytes]:
                def handle(data: bytes) -> bytes:
                    counts[name] += 1
                    return data
                return handle

            consumers = [teomq.Consumer(spec(broker), counter(n), name=n, prefetch=1) for n in counts]
            for c in consumers:
                await c.start()
            async with teomq.Producer(spec(broker), timeout=LONG) as producer:
                answers = await asyncio.gather(*(producer.request(f"{i}") for i in range(300)))
                assert answers == [f"{i}".encode() for i in range(300)]
            assert sum(counts.values()) == 300
            assert all(n >= 75 for n in counts.values()), counts  # each at least a quarter
            for c in consumers:
                await c.close()
            assert_idle(broker)

    arun(main())


def test_handshake_timeout_closes_only_silent_connections(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path, handshake_timeout=0.5) as broker:
            async with teomq.Consumer(spec(broker), lambda d: d[::-1], name="c") as consumer, \
                    teomq.Producer(spec(broker), timeout=LONG) as producer:
                loop = asyncio.get_running_loop()
                silent = socket.create_connection(("127.0.0.1", broker.port))
                silent.setblocking(False)
                data = b""
                while True:  # read to EOF: the broker closes the connection after its ERROR
                    chunk = await loop.sock_recv(silent, 4096)
                    if not chunk:
                        break
                    data += chunk
                silent.close()
                frames = FrameDecoder(DEFAULT_MAX_PAYLOAD).feed(data)
                assert [f[0] for f in frames] == [FrameType.ERROR]
                doc = msgpack.unpackb(frames[0][3])
                assert doc["code"] == ErrorCode.HANDSHAKE and doc["reason"]
                assert broker.stats()["errors"] == 1
                # the clients that said HELLO (before the silent one connected) are untouched
                assert consumer.connected and producer.connected
                assert await producer.request(b"olleh") == b"hello"

    arun(main())


def test_slow_reader_gets_every_byte_in_order(arun: Any, tmp_path: Path) -> None:
    """A consumer that stops reading: the broker's direct socket writes fall back to the
    transport's buffer; once the consumer reads again every frame arrives whole and in order."""
    count, size = 200, 60_000  # ~12 MB: far more than the socket buffers hold

    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            hello = {"v": 1, "role": "consumer", "name": "slow", "prefetch": count, "nonce": b"n" * 16}
            writer.write(encode_frame(FrameType.HELLO, 0, 0, msgpack.packb(hello)))
            await writer.drain()
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for n in range(count):
                    producer.publish(bytes([n % 251]) * size)
                await until(lambda: broker.stats()["out"] == count, "all deliveries handed to the slow consumer")
                decoder = FrameDecoder(DEFAULT_MAX_PAYLOAD)
                frames: list[tuple[int, int, int, bytes]] = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while len(frames) < count + 1:  # WELCOME + every DELIVER
                    assert loop.time() < deadline, f"only {len(frames)} frames arrived"
                    frames += decoder.feed(await reader.read(1 << 16))
                assert frames[0][0] == FrameType.WELCOME
                delivers = frames[1:]
                assert [f[0] for f in delivers] == [FrameType.DELIVER] * count
                assert [f[3] for f in delivers] == [bytes([n % 251]) * size for n in range(count)]
            writer.close()

    arun(main())


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 65536, DEFAULT_MAX_PAYLOAD])
def test_payloads_around_the_forwarding_threshold_round_trip(arun: Any, tmp_path: Path, size: int) -> None:
    """From 4 KiB the broker derives forwarded frames' CRCs instead of recomputing them; the
    clients' decoders verify every CRC, so a wrong derivation fails here."""
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            async with teomq.Consumer(spec(broker), lambda d: d[::-1], name="c"), \
                    teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
                assert await producer.request(payload) == payload[::-1]
            assert_idle(broker)

    arun(main())


def test_ping_is_a_barrier_for_earlier_publishes(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for n in range(500):
                    producer.publish(b"m%d" % n)
                assert await producer.ping() >= 0
                assert broker.stats()["in"] == 500  # all accepted before the PONG came back
                assert broker.stats()["queue"] == 500

    arun(main())


def test_publishers_meet_backpressure_not_refusals(arun: Any, tmp_path: Path) -> None:
    """Past 3/4 of queue_max the broker stops reading from producers (TCP back-pressure) and
    resumes at a quarter of that: a burst 5x the bound is delivered whole, nothing refused."""
    bound, burst = 4000, 20000

    async def main() -> None:
        async with make_broker(tmp_path, queue_max=bound) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for n in range(burst):
                    producer.publish(b"%06d" % n + b"." * 94)
                await until(lambda: broker.stats()["backpressure"] == 1, "the high mark")
                s = broker.stats()
                assert s["queue"] >= bound * 3 // 4 and s["refused"] == 0, s
                seen: list[bytes] = []
                async with teomq.Consumer(spec(broker), lambda d: seen.append(d[:6]), name="c", prefetch=256):
                    await until(lambda: len(seen) == burst, "every message delivered", timeout=120)
                    await producer.ping()
                s = broker.stats()
                assert (s["in"], s["refused"], s["backpressure"]) == (burst, 0, 0), s
                assert seen == [b"%06d" % n for n in range(burst)]
            assert_idle(broker)

    arun(main())
