"""The core's seams with the control plane, in-process (the stdlib loop and uvloop):

- the core writes to a socket itself only when the transport is that socket: a transport that
  wraps another (as TLS does) gets every byte through ``write()``;
- a hook that raises while a frame is handled leaves the connection consistent: the frame is
  consumed once, the connection is closed with ERROR INTERNAL, what it held is requeued, and
  everyone else is served on;
- a client that announces no capabilities (a HELLO of before ``caps``) is served as before;
- answers go to the producer's session (the id its HELLO gives); one connection has a session
  at a time, and a session lives as long as its connection.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest

import teomq
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.broker import BrokerConnection
from teomq.protocol import CAPABILITIES, DEFAULT_MAX_PAYLOAD, ErrorCode, FrameType as T
from rawwire import hello
from test_broker_api import LONG, make_broker, spec
from waiting import until

pytestmark = pytest.mark.usefixtures("teomq_home")


class Recorder(asyncio.Transport):
    """A transport that wraps the real one (as TLS does) and counts what goes through it."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self.inner = inner
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.inner.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)  # the socket is visible, as under TLS

    def __getattr__(self, name: str) -> Any:  # close, pause_reading, get_write_buffer_size ...
        return getattr(self.inner, name)

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()


class Wrapped(asyncio.BufferedProtocol):
    """Serves a BrokerConnection over a Recorder instead of the loop's own transport."""

    def __init__(self, conn: BrokerConnection, seen: list[Recorder]) -> None:
        self.conn = conn
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        rec = Recorder(transport)  # type: ignore[arg-type]
        self.seen.append(rec)
        self.conn.connection_made(rec)

    def get_buffer(self, sizehint: int) -> Any:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class Peer(asyncio.Protocol):
    """A raw client: counts every byte it receives, decodes frames, answers DELIVERs if it consumes."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.received = 0
        self.decoder = FrameDecoder(DEFAULT_MAX_PAYLOAD)
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.transport: asyncio.Transport | None = None
        self.on_pong: Any = None  # called as each PONG arrives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if frame[0] == T.PONG and self.on_pong is not None:
                self.on_pong()
            if self.answer and frame[0] == T.DELIVER:
                assert self.transport is not None
                self.transport.write(encode_frame(T.ANSWER, 0, frame[2], frame[3][::-1]))

    def of(self, ftype: int) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == ftype]


async def peer(port: int, role: str, answer: bool = False, **extra: Any) -> Peer:
    loop = asyncio.get_running_loop()
    _, p = await loop.create_connection(lambda: Peer(answer), "127.0.0.1", port)
    assert p.transport is not None
    extra.setdefault("name", f"raw-{role}")
    if role != "producer":
        extra.setdefault("prefetch", 64)
    p.transport.write(hello(role, **extra))
    await until(lambda: p.of(T.WELCOME), f"the {role}'s WELCOME")
    return p


def test_a_wrapping_transport_gets_every_byte(arun: Any, tmp_path: Path) -> None:
    n, size = 300, 16384  # large payloads: the core would write them in place with sendmsg
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            loop = asyncio.get_running_loop()
            seen: list[Recorder] = []
            server = await loop.create_server(lambda: Wrapped(BrokerConnection(broker._disp, broker), seen),
                                              "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            consumer = await peer(port, "consumer", answer=True)
            producer = await peer(port, "producer")
            assert producer.transport is not None
            producer.transport.write(b"".join(encode_frame(T.SEND, 0, i + 1, bytes([i % 251]) * size)
                                              for i in range(n)))
            await until(lambda: len(producer.of(T.REPLY)) == n, f"{n} replies")
            assert sorted(f[2] for f in producer.of(T.REPLY)) == list(range(1, n + 1))
            await until(lambda: sum(r.written for r in seen) == consumer.received + producer.received,
                        "every byte the peers received to have gone through the wrapper")
            assert consumer.received > n * size and producer.received > n * size
            server.close()
            await server.wait_closed()

    arun(main())


def test_a_hook_that_raises_mid_read_leaves_the_connection_consistent(arun: Any, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            def log_hook(conn: Any, mid: int, payload: bytes) -> None:
                if payload == b"boom":
                    raise RuntimeError("a bug in a hook")

            broker._disp.on_message = log_hook
            got: list[bytes] = []
            async with teomq.Consumer(spec(broker), lambda d: got.append(d) or d, name="c"):
                p = await peer(broker.port, "producer")
                assert p.transport is not None
                # three SENDs in one write: the hook raises on the second
                p.transport.write(b"".join(encode_frame(T.SEND, 0, i, body)
                                           for i, body in enumerate((b"a", b"boom", b"c"), 1)))
                await until(lambda: p.of(T.ERROR), "the ERROR frame")
                err = msgpack.unpackb(p.of(T.ERROR)[-1][3])
                assert err["code"] == ErrorCode.INTERNAL and "logged at the broker" in err["reason"]
                # "a" and "boom" were accepted before the hook ran: delivered, once each; the
                # rest of that read went with the connection, and nothing was handled twice
                await until(lambda: len(got) == 2, "the two accepted messages")
                assert got == [b"a", b"boom"] and broker.stats()["in"] == 2
                async with teomq.Producer(spec(broker), name="next", timeout=LONG) as other:
                    assert await other.request(b"still serving") == b"still serving"
        assert any("internal error while handling its frame" in r.getMessage() and r.exc_info
                   for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="teomq.broker"):
        arun(main())


def test_a_raising_hello_hook_closes_only_that_connection(arun: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = BrokerConnection._hello

    def exploding_hello(self: BrokerConnection, fid: int, payload: bytes) -> None:
        if b"explode" in payload:
            raise KeyError("a bug in the HELLO handler")
        real(self, fid, payload)

    monkeypatch.setattr(BrokerConnection, "_hello", exploding_hello)

    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            loop = asyncio.get_running_loop()
            _, p = await loop.create_connection(lambda: Peer(False), "127.0.0.1", broker.port)
            assert p.transport is not None
            p.transport.write(hello("producer", name="explode") + encode_frame(T.SEND, 0, 1, b"x"))
            await until(lambda: p.of(T.ERROR), "the ERROR frame")
            assert msgpack.unpackb(p.of(T.ERROR)[0][3])["code"] == ErrorCode.INTERNAL
            assert not p.of(T.WELCOME) and broker.stats()["in"] == 0
            async with teomq.Consumer(spec(broker), lambda d: d, name="c"), \
                    teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                assert await producer.request(b"ok") == b"ok"

    arun(main())


def test_a_client_without_capabilities_is_served_as_before(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path, queue_max=40) as broker:
            consumer = await peer(broker.port, "consumer", answer=True)
            both = await peer(broker.port, "both", answer=True)  # no caps, consumes too: never gets FLOW
            welcome = msgpack.unpackb(both.of(T.WELCOME)[0][3])
            assert welcome["caps"] == list(CAPABILITIES) and welcome["prefetch"] == 64
            assert both.transport is not None and consumer.transport is not None
            consumer.transport.pause_reading()  # answers stop: held messages reach the bound
            at_pong: list[int] = []
            both.on_pong = lambda: at_pong.append(broker.stats()["in"])
            both.transport.write(b"".join(encode_frame(T.SEND, 0, i, b"m%d" % i) for i in range(1, 201))
                                 + encode_frame(T.PING, 0, 77))
            await until(lambda: broker.stats()["backpressure"] == 1, "the high mark")
            assert not at_pong  # the PING waits behind the parked SENDs
            consumer.transport.resume_reading()
            await until(lambda: len(both.of(T.REPLY)) == 200, "every message answered once let go")
            assert at_pong == [200]  # its PONG came once every SEND before it was accepted
            assert not both.of(T.FLOW) and not both.of(T.ERROR)
            assert sorted(f[2] for f in both.of(T.REPLY)) == list(range(1, 201))
            flow = await peer(broker.port, "both", caps=["flow", "no-such-cap"])
            assert msgpack.unpackb(flow.of(T.WELCOME)[0][3])["caps"] == list(CAPABILITIES)

    arun(main())


def test_a_session_is_held_by_one_connection_at_a_time(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            consumer = await peer(broker.port, "consumer", answer=True)
            first = await peer(broker.port, "producer", session="s-42")
            assert msgpack.unpackb(first.of(T.WELCOME)[0][3])["session"] is True
            loop = asyncio.get_running_loop()
            _, second = await loop.create_connection(lambda: Peer(False), "127.0.0.1", broker.port)
            assert second.transport is not None and first.transport is not None
            second.transport.write(hello("producer", name="raw-second", session="s-42"))
            await until(lambda: second.of(T.ERROR), "the second HELLO's refusal")
            err = msgpack.unpackb(second.of(T.ERROR)[0][3])
            assert err["code"] == ErrorCode.HANDSHAKE and "session is already connected" in err["reason"]
            assert not second.of(T.WELCOME)
            await until(lambda: second.transport is None or second.transport.is_closing(), "closed")
            # the first keeps its session: its answers come to it
            first.transport.write(encode_frame(T.SEND, 0, 5, b"ping"))
            await until(lambda: first.of(T.REPLY), "the first producer's answer")
            assert first.of(T.REPLY)[0][2:] == (5, b"gnip")
            first.transport.close()
            await until(lambda: broker.stats()["connections"] == 1, "the first gone")
            # its session ended with its connection: the name is free again
            third = await peer(broker.port, "producer", session="s-42")
            assert msgpack.unpackb(third.of(T.WELCOME)[0][3])["session"] is True
            nameless = await peer(broker.port, "producer")  # no session: served as before
            assert msgpack.unpackb(nameless.of(T.WELCOME)[0][3])["session"] is False
            assert nameless.transport is not None and consumer.transport is not None
            nameless.transport.write(encode_frame(T.SEND, 0, 6, b"abc"))
            await until(lambda: nameless.of(T.REPLY), "the nameless producer's answer")

    arun(main())


def test_a_bad_session_is_refused(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path) as broker:
            loop = asyncio.get_running_loop()
            for bad in ("", "x" * 129, 42):
                _, p = await loop.create_connection(lambda: Peer(False), "127.0.0.1", broker.port)
                assert p.transport is not None
                p.transport.write(hello("producer", session=bad))
                await until(lambda: p.of(T.ERROR), f"session {bad!r:.20} refused")
                err = msgpack.unpackb(p.of(T.ERROR)[0][3])
                assert err["code"] == ErrorCode.HANDSHAKE and "session" in err["reason"], err

    arun(main())


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_confirm_goes_only_to_a_client_that_announced_it(arun: Any, tmp_path: Path, storage: str) -> None:
    """SENDs flagged CONFIRM (0x10) get CONFIRM frames (id the last, payload the count) only on a
    connection whose HELLO named "confirm"; one without it is served as before."""
    async def main() -> None:
        async with make_broker(tmp_path, storage=storage) as broker:
            plain = await peer(broker.port, "producer")
            speaks = await peer(broker.port, "producer", caps=["confirm"])
            assert plain.transport is not None and speaks.transport is not None
            for p in (plain, speaks):
                p.transport.write(b"".join(encode_frame(T.SEND, 0x11, i, b"c%d" % i) for i in range(1, 51))
                                  + encode_frame(T.PING, 0, 99))
            await until(lambda: plain.of(T.PONG) and speaks.of(T.PONG), "both PONGs")
            await until(lambda: sum(int.from_bytes(f[3], "little") for f in speaks.of(T.CONFIRM)) == 50,
                        "50 confirmed")
            confirms = speaks.of(T.CONFIRM)
            assert confirms[-1][2] == 50 and all(len(f[3]) == 4 for f in confirms)
            assert not plain.of(T.CONFIRM) and not plain.of(T.ERROR)
            assert broker.stats()["queue"] == 100

    arun(main())


def test_awaiting_publish_raises_for_a_refused_message(arun: Any, tmp_path: Path) -> None:
    """A publish the broker refuses (here UNKNOWN_COMMAND) is never confirmed: awaiting it raises
    the refusal, and the confirmations of the others around it still come, in order."""
    async def main() -> None:
        async with make_broker(tmp_path, commands=[teomq.Command("jobs", routing="queue")]) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                sent = [producer.publish(b"jobs" if i % 3 else b"nope") for i in range(30)]
                for i, c in enumerate(sent):
                    if i % 3:
                        await c
                        assert c.confirmed
                    else:
                        with pytest.raises(teomq.BrokerError) as info:
                            await c
                        assert info.value.code == ErrorCode.UNKNOWN_COMMAND
                        assert c.done() and not c.confirmed
                await producer.confirmed(0)
                assert producer.unconfirmed == 0
                late = producer.publish(b"nope")           # refused after everything else
                with pytest.raises(teomq.BrokerError):
                    await late
                assert broker.stats()["queue"] == 20

    arun(main())


def test_a_refused_publish_stays_refused_after_many_more_refusals(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_broker(tmp_path, commands=[teomq.Command("jobs", routing="queue")]) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                refused = [producer.publish(b"nope") for _ in range(12_000)]
                ok = producer.publish(b"jobs")
                await ok
                assert ok.confirmed
                for c in (refused[0], refused[100], refused[-1]):
                    assert c.done() and not c.confirmed
                    with pytest.raises(teomq.BrokerError):
                        await c

    arun(main())


def test_a_publish_the_broker_handles_itself_is_confirmed(arun: Any, tmp_path: Path) -> None:
    """In the command scheme a SEND of a broker command (hello) is answered by the broker, not
    queued: a publish of it is confirmed in its turn, not left waiting."""
    async def main() -> None:
        async with make_broker(tmp_path, commands=[teomq.Command("jobs", routing="queue")]) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                cs = [producer.publish(b"jobs"), producer.publish(b"hello/bob"), producer.publish(b"jobs")]
                for c in cs:
                    await asyncio.wait_for(c, LONG)
                    assert c.confirmed
                await producer.confirmed(0)

    arun(main())
