"""teomq.client against a scripted peer: a real TCP server speaking the wire protocol.

The peer is not the broker: it uses the real frame codec and a real Ed25519 identity,
and each test scripts what it does with HELLO and SEND frames (answer, hold, refuse,
drop the connection) and which frames it pushes after WELCOME (DELIVER, PING, ...).
Every test runs on the stdlib event loop and on uvloop.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.client import Client, Consumer, Producer, _to_payload
from teomq.errors import AddressError, BrokerError, ConnectionLost, RequestTimeout
from teomq.identity import BrokerIdentity
from teomq.protocol import DEFAULT_MAX_PAYLOAD, DELAY_MAX, PRIORITY_MAX, ErrorCode, Flag, FrameType as T
from waiting import until

def echo(conn: PeerConn, flags: int, fid: int, payload: bytes) -> None:
    if not flags & Flag.NO_REPLY:
        conn.send(T.REPLY, 0, fid, b"re:" + payload)


def hold(conn: PeerConn, flags: int, fid: int, payload: bytes) -> None:
    conn.peer.held.append((conn, fid, payload))


class PeerConn(asyncio.Protocol):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.decoder = FrameDecoder(peer.max_payload)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer.conns.append(self)

    def send(self, ftype: int, flags: int, fid: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(ftype, flags, fid, payload))

    def error(self, fid: int, code: int, reason: str) -> None:
        self.send(T.ERROR, 0, fid, msgpack.packb({"code": code, "reason": reason}))

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        for ftype, flags, fid, payload in self.decoder.feed(data):
            peer.order.append((ftype, fid))
            if ftype == T.HELLO:
                hello = msgpack.unpackb(payload)
                peer.hellos.append(hello)
                peer.on_hello(self, hello)
            elif ftype == T.SEND:
                peer.sends.append((flags, fid, payload))
                peer.on_send(self, flags, fid, payload)
            elif ftype == T.ANSWER:
                peer.answers.append((flags, fid, payload))
            elif ftype == T.PONG:
                peer.pongs.append(fid)
            elif ftype == T.ERROR:
                peer.errors.append(msgpack.unpackb(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Peer:
    """Scripted broker endpoint. ``after_welcome`` frames go out in the same write as WELCOME."""

    def __init__(self, *, on_send: Callable[..., None] = echo, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 after_welcome: list[tuple[int, int, int, bytes]] | None = None,
                 sign_nonce: Callable[[bytes], bytes] | None = None,
                 on_hello: Callable[[PeerConn, dict[str, Any]], None] | None = None) -> None:
        self.identity = BrokerIdentity.generate()
        self.on_send = on_send
        self.max_payload = max_payload
        self.after_welcome = after_welcome or []
        self.sign_nonce = sign_nonce or (lambda n: n)
        if on_hello is not None:
            self.on_hello = on_hello  # type: ignore[method-assign,assignment]
        self.hellos: list[dict[str, Any]] = []
        self.sends: list[tuple[int, int, bytes]] = []
        self.answers: list[tuple[int, int, bytes]] = []
        self.pongs: list[int] = []
        self.errors: list[dict[str, Any]] = []
        self.order: list[tuple[int, int]] = []  # (type, id) of every frame, in arrival order
        self.held: list[tuple[PeerConn, int, bytes]] = []
        self.conns: list[PeerConn] = []

    def on_hello(self, conn: PeerConn, hello: dict[str, Any]) -> None:
        welcome = {"v": 1, "address": self.identity.address, "pubkey": self.identity.public_key,
                   "sig": self.identity.sign_welcome(self.sign_nonce(hello["nonce"])),
                   "max_payload": self.max_payload, "server": "scripted-peer"}
        out = [encode_frame(T.WELCOME, 0, 0, msgpack.packb(welcome))]
        out += [encode_frame(*frame) for frame in self.after_welcome]
        assert conn.transport is not None
        conn.transport.write(b"".join(out))

    def release(self) -> None:
        """Answer every held SEND now."""
        held, self.held = self.held, []
        for conn, fid, payload in held:
            conn.send(T.REPLY, 0, fid, b"re:" + payload)

    @property
    def spec(self) -> str:
        return f"{self.identity.address}@127.0.0.1:{self.port}"

    async def __aenter__(self) -> Peer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: PeerConn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        await self.server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- producing ----------------------------------------------------------------------------


def test_request_round_trip_and_hello(arun):
    async def main():
        async with Peer() as peer:
            async with Producer(peer.spec, name="p1") as p:
                assert p.address == peer.identity.address
                assert p.server == "scripted-peer"
                assert p.name == "p1" and p.connected
                assert await p.request(b"hello") == b"re:hello"
                assert await p.request("h\u00e9llo") == "re:h\u00e9llo".encode()
                assert await p.request(bytearray(b"ba")) == b"re:ba"
                assert p.pending == 0
                assert p.stats["sent"] == 3 and p.stats["replies"] == 3
            assert not p.connected
            hello = peer.hellos[0]
            assert hello["v"] == 1 and hello["role"] == "producer" and hello["name"] == "p1"
            assert hello["prefetch"] == 0 and hello["auth"] is None and len(hello["nonce"]) == 16
            assert [(flags, fid) for flags, fid, _ in peer.sends] == [(0, 1), (0, 2), (0, 3)]
            # (host, port) and ":port" specs: no expected address, the signature still verifies
            for spec in [("127.0.0.1", peer.port), f":{peer.port}"]:
                async with Producer(spec) as p:
                    assert p.address == peer.identity.address
                    assert await p.request(b"x") == b"re:x"
            assert len({h["nonce"] for h in peer.hellos}) == 3

    arun(main())


def test_many_in_flight_matched_by_id(arun):
    n = 300

    def reverse_batch(conn, flags, fid, payload):
        hold(conn, flags, fid, payload)
        if len(conn.peer.held) == n:
            for c, i, pl in reversed(conn.peer.held):
                c.send(T.REPLY, 0, i, b"re:" + pl)

    async def main():
        async with Peer(on_send=reverse_batch) as peer, Producer(peer.spec) as p:
            got = await asyncio.gather(*(p.request(b"m%d" % i) for i in range(n)))
            assert got == [b"re:m%d" % i for i in range(n)]
            assert sorted(fid for _, fid, _ in peer.sends) == list(range(1, n + 1))

    arun(main())


def test_frames_of_one_pass_go_out_in_one_write(arun):
    async def main():
        async with Peer() as peer, Producer(peer.spec) as p:
            for _ in range(100):
                p.publish(b"x")
            conn = p._conn
            assert len(conn._wbuf) == 100 * 25  # encoded, not yet written
            await asyncio.sleep(0)  # the one scheduled flush runs
            assert len(conn._wbuf) == 0
            await until(lambda: len(peer.sends) == 100, "100 SENDs")
            assert {flags for flags, _, _ in peer.sends} == {Flag.NO_REPLY}
            assert p.pending == 0

    arun(main())


def test_send_callback_called_exactly_once(arun):
    def script(conn, flags, fid, payload):
        (hold if payload.startswith(b"hold") else echo)(conn, flags, fid, payload)

    async def main():
        calls: list[tuple[int, bytes | None, BaseException | None]] = []

        def cb(mid, data, err):
            calls.append((mid, data, err))

        def bad_cb(mid, data, err):
            calls.append((mid, data, err))
            raise RuntimeError("callback bug")

        async with Peer(on_send=script) as peer, Producer(peer.spec, timeout=10) as p:
            ids = [p.send(b"ok1", cb), p.send(b"hold", cb, timeout=0.2), p.send(b"ok2", bad_cb)]
            assert ids == [1, 2, 3]
            await until(lambda: len(calls) == 3, "three callbacks")
            peer.release()  # the late answer to message 2 ...
            assert await p.request(b"barrier") == b"re:barrier"  # ... arrived before this one
            assert len(calls) == 3
            outcome = {mid: (data, err) for mid, data, err in calls}
            assert outcome[1] == (b"re:ok1", None) and outcome[3] == (b"re:ok2", None)
            assert outcome[2][0] is None and isinstance(outcome[2][1], RequestTimeout)
            with pytest.raises(TypeError):
                p.send(b"x", None)  # type: ignore[arg-type]

    arun(main())


def test_timeouts_default_and_custom(arun):
    async def main():
        async with Peer(on_send=hold) as peer, Producer(peer.spec, timeout=0.2) as p:
            with pytest.raises(RequestTimeout, match="within 0.2 s"):
                await p.request(b"a")
            with pytest.raises(RequestTimeout, match="within 0.1 s"):
                await p.request(b"b", timeout=0.1)
            # a long custom timeout outlives waves of default ones
            long = asyncio.ensure_future(p.request(b"long", timeout=30))
            short = []
            conn = p._conn
            for _ in range(3):  # three waves, each in a deadline bucket of its own
                last = conn._core.next_id + 19
                short += [asyncio.ensure_future(p.request(b"s")) for _ in range(20)]
                await until(lambda: conn._core.next_id > last, "the wave sent")
                await until(lambda: conn._bucket_last >= last, "a tick bucketing the wave")
            results = await asyncio.gather(*short, return_exceptions=True)
            assert all(isinstance(r, RequestTimeout) for r in results)
            assert not long.done() and p.pending == 1
            peer.release()  # late answers to the short ones are dropped
            assert await long == b"re:long"
            assert p.pending == 0 and p.stats["timeouts"] == 62
            with pytest.raises(ValueError):
                await p.request(b"x", timeout=0)

    arun(main())


def test_cancelled_request_is_forgotten(arun):
    def script(conn, flags, fid, payload):
        (hold if payload == b"x" else echo)(conn, flags, fid, payload)

    async def main():
        async with Peer(on_send=script) as peer, Producer(peer.spec) as p:
            task = asyncio.ensure_future(p.request(b"x"))
            await until(lambda: p.pending == 1 and peer.held, "the SEND")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert p.pending == 0
            peer.release()
            assert await p.request(b"y") == b"re:y"  # after the dropped late answer

    arun(main())


def test_queue_full_fails_only_that_request(arun):
    def script(conn, flags, fid, payload):
        if payload == b"full":
            conn.error(fid, ErrorCode.QUEUE_FULL, "queue is full: message not accepted")
        else:
            echo(conn, flags, fid, payload)

    async def main():
        async with Peer(on_send=script) as peer, Producer(peer.spec) as p:
            with pytest.raises(BrokerError) as ei:
                await p.request(b"full")
            assert ei.value.code == ErrorCode.QUEUE_FULL and "queue is full" in ei.value.reason
            got: list[Any] = []
            p.send(b"full", lambda *a: got.append(a))
            assert await p.request(b"fine") == b"re:fine"
            assert len(got) == 1 and isinstance(got[0][2], BrokerError) and got[0][1] is None
            assert p.connected and p.pending == 0

    arun(main())


def test_connection_lost_fails_every_pending_request(arun):
    def script(conn, flags, fid, payload):
        hold(conn, flags, fid, payload)
        if len(conn.peer.held) == 5:
            conn.transport.close()

    async def main():
        async with Peer(on_send=script) as peer:
            p = Producer(peer.spec, reconnect=False)  # (fails fast: as before reconnecting)
            await p.connect()
            got: list[Any] = []
            p.send(b"cb", lambda *a: got.append(a))
            reqs = [asyncio.ensure_future(p.request(b"r%d" % i)) for i in range(4)]
            results = await asyncio.gather(*reqs, return_exceptions=True)
            assert all(isinstance(r, ConnectionLost) for r in results), results
            assert len(got) == 1 and isinstance(got[0][2], ConnectionLost)
            with pytest.raises(ConnectionLost):
                await p.wait_closed()
            assert not p.connected
            with pytest.raises(ConnectionLost):
                await p.request(b"after")
            with pytest.raises(ConnectionLost):
                p.publish(b"after")
            await p.close()  # idempotent after a loss

    arun(main())


def test_fatal_error_frame_closes_connection(arun):
    def script(conn, flags, fid, payload):
        conn.error(0, ErrorCode.SHUTDOWN, "broker is stopping")
        conn.transport.close()

    async def main():
        async with Peer(on_send=script) as peer, Producer(peer.spec) as p:
            with pytest.raises(ConnectionLost, match="broker is stopping") as ei:
                await p.request(b"x")
            assert isinstance(ei.value.__cause__, BrokerError)
            assert ei.value.__cause__.code == ErrorCode.SHUTDOWN

    arun(main())


def test_unexpected_frame_from_broker_is_fatal(arun):
    async def main():
        async with Peer(after_welcome=[(T.SEND, 0, 9, b"?")]) as peer:
            p = Producer(peer.spec, reconnect=False)  # (with reconnect it tries again, and again)
            with pytest.raises(ConnectionLost, match="unexpected SEND"):
                await p.connect()
                await p.wait_closed()
            await until(lambda: peer.errors, "the client's ERROR")
            assert peer.errors[0]["code"] == ErrorCode.NOT_ALLOWED

    arun(main())


def test_ping_is_answered(arun):
    async def main():
        async with Peer(after_welcome=[(T.PING, 0, 77, b"")]) as peer, Producer(peer.spec):
            await until(lambda: peer.pongs == [77], "PONG 77")

    arun(main())


def test_payload_limit_from_welcome_and_local(arun):
    async def main():
        def ok(conn, flags, fid, payload):
            conn.send(T.REPLY, 0, fid, b"ok")

        async with Peer(max_payload=1000, on_send=ok) as peer:
            async with Producer(peer.spec) as p:
                assert p.max_payload == 1000
                for call in (lambda: p.publish(b"x" * 1001), lambda: p.send(b"x" * 1001, print)):
                    with pytest.raises(ValueError, match="over the limit of 1000"):
                        call()
                with pytest.raises(ValueError):
                    await p.request(memoryview(array.array("i", [0] * 251)))  # 1004 bytes
                assert await p.request(b"x" * 1000) == b"ok"
                assert len(peer.sends) == 1 and p.pending == 0
                with pytest.raises(TypeError):
                    p.publish(123)  # type: ignore[arg-type]
            async with Producer(peer.spec, max_payload=10) as p:
                assert p.max_payload == 10
                with pytest.raises(ValueError, match="limit of 10"):
                    await p.request(b"x" * 11)

    arun(main())


def test_broker_held_to_its_own_payload_limit(arun):
    def too_big(conn, flags, fid, payload):
        conn.send(T.REPLY, 0, fid, b"y" * 1001)

    async def main():
        async with Peer(max_payload=1000, on_send=too_big) as peer, Producer(peer.spec) as p:
            with pytest.raises(ConnectionLost, match="over the limit of 1000"):
                await p.request(b"x")
            await until(lambda: peer.errors, "the client's ERROR")
            assert peer.errors[0]["code"] == ErrorCode.TOO_LARGE

    arun(main())


def welcome_with(caps: list[str]) -> Callable[[PeerConn, dict[str, Any]], None]:
    """A Peer's on_hello that answers a WELCOME announcing ``caps``."""

    def on_hello(conn: PeerConn, hello: dict[str, Any]) -> None:
        peer = conn.peer
        welcome = {"v": 1, "address": peer.identity.address, "pubkey": peer.identity.public_key,
                   "sig": peer.identity.sign_welcome(hello["nonce"]), "max_payload": peer.max_payload,
                   "server": "scripted-peer", "caps": caps}
        conn.send(T.WELCOME, 0, 0, msgpack.packb(welcome))
    return on_hello


def test_a_cancel_keeps_its_place_behind_sends_held_back_by_flow(arun):
    """Client.cancel of a send() still held back (FLOW) drops it unsent; of one already sent,
    sends CANCEL after the SENDs held back before it, not past them (found in review)."""
    caps = ["flow", "confirm", "lease", "deadline", "cancel"]

    on_hello = welcome_with(caps)

    async def main():
        from teomq import Cancelled
        async with Peer(on_send=hold, on_hello=on_hello) as peer, Producer(peer.spec, timeout=30) as p:
            outcomes: dict[int, list[BaseException | None]] = {}

            def callback(mid: int, answer: bytes | None, err: BaseException | None) -> None:
                outcomes.setdefault(mid, []).append(err)

            sent = p.send(b"sent", callback)
            await until(lambda: peer.sends, "the first SEND")
            peer.conns[0].send(T.FLOW, 1, 0)  # HOLD
            await until(lambda: p._conn._held, "the hold")
            unsent = p.send(b"unsent", callback)
            behind = p.send(b"behind", callback)
            assert p.cancel(unsent) and p.cancel(sent)
            assert [type(e) for e in outcomes[unsent] + outcomes[sent]] == [Cancelled, Cancelled]
            await asyncio.sleep(0.2)
            assert [f for f in peer.order if f[0] != T.HELLO] == [(T.SEND, sent)]  # both wait
            peer.conns[0].send(T.FLOW, 0, 0)  # go on
            await until(lambda: len(peer.order) >= 4, "the held frames")
            assert [f for f in peer.order if f[0] != T.HELLO] == [(T.SEND, sent), (T.SEND, behind),
                                                                   (T.CANCEL, sent)]
            assert behind not in outcomes

    arun(main())


def test_a_publish_held_back_by_flow_keeps_its_delay_and_ttl_from_when_it_was_made(arun):
    """A publish(delay=, ttl=) and a request(delay=) the broker holds back (FLOW) go out with
    their delay (and a publish's ttl) counted from the call, not from the release: the time held
    is taken off (a delay by whole ms gone, never early; a ttl by every ms begun, never longer)."""
    caps = ["flow", "confirm", "lease", "deadline", "cancel", "priority", "delay"]

    on_hello = welcome_with(caps)

    async def main():
        async with Peer(on_send=hold, on_hello=on_hello) as peer, Producer(peer.spec, timeout=30) as p:
            p.publish(b"first")
            await until(lambda: peer.sends, "the first SEND")
            peer.conns[0].send(T.FLOW, 1, 0)  # HOLD
            await until(lambda: p._conn._held, "the hold")
            made = time.monotonic()
            p.publish(b"later", delay=2.0, ttl=5.0)
            task = asyncio.ensure_future(p.request(b"asked", delay=3.0, timeout=20.0))
            await asyncio.sleep(0.5)
            assert len(peer.sends) == 1
            peer.conns[0].send(T.FLOW, 0, 0)  # go on
            await until(lambda: len(peer.sends) == 3, "the held SENDs")
            held_ms = (time.monotonic() - made) * 1000
            by_payload = {payload[-5:]: (flags, payload) for flags, _, payload in peer.sends}
            flags, payload = by_payload[b"later"]
            assert flags & Flag.DEADLINE and flags & Flag.DELAY
            ttl_ms, delay_ms = struct.unpack_from("<II", payload)
            assert 5000 - held_ms - 50 <= ttl_ms <= 5000 - 500 and 2000 - held_ms - 50 <= delay_ms <= 2000 - 500 + 1
            flags, payload = by_payload[b"asked"]   # (a request waits for the release to be sent:
            deadline_ms, delay_ms = struct.unpack_from("<II", payload)   # its timeout counts from then)
            assert deadline_ms == 20000 and 3000 - held_ms - 50 <= delay_ms <= 3000 - 500 + 1
            task.cancel()

    arun(main())


@pytest.mark.parametrize("caps", [["deadline", "priority", "delay"], []])
def test_priority_delay_and_ttl_arguments_are_checked_before_anything_is_sent(arun, caps):
    """Bad values raise ValueError; a broker that does not speak "priority", "delay" or
    "deadline" makes the argument raise RuntimeError; nothing reaches the broker either way."""

    on_hello = welcome_with(caps)

    async def main():
        async with Peer(on_send=hold, on_hello=on_hello) as peer, Producer(peer.spec, timeout=30) as p:
            bad = [dict(priority=-1), dict(priority=8), dict(priority=True), dict(priority=1.0),
                   dict(delay=-0.5), dict(delay=float("nan")), dict(delay="1"), dict(delay=1, not_before=time.time()),
                   dict(delay=DELAY_MAX + 1), dict(ttl=0), dict(ttl=-1), dict(ttl=DELAY_MAX + 1)]
            for kw in bad:
                with pytest.raises(ValueError):
                    p.publish(b"x", **kw)
            for kw in bad[:-3]:
                with pytest.raises(ValueError):
                    await p.request(b"x", **kw)
            with pytest.raises(ValueError if caps else RuntimeError, match="shorter than its timeout|speak"):
                await p.request(b"x", delay=5, timeout=5)
            good = [dict(priority=0), dict(priority=PRIORITY_MAX), dict(delay=0.25), dict(ttl=1.5),
                    dict(not_before=time.time() + 60)]
            for kw in good:
                if caps:
                    p.publish(b"x", **kw)
                else:
                    with pytest.raises(RuntimeError, match="does not (speak|take)"):
                        p.publish(b"x", **kw)
            p.publish(b"end")     # after any frame sent before it
            await until(lambda: peer.sends and peer.sends[-1][2] == b"end", "the last publish")
            assert len(peer.sends) == (len(good) if caps else 0) + 1

    arun(main())


def test_flow_control_request_waits_for_resume(arun):
    async def main():
        async with Peer() as peer, Producer(peer.spec) as p:
            await until(lambda: peer.conns, "peer connection")
            peer.conns[0].transport.pause_reading()
            chunk = b"z" * 65536
            for _ in range(2000):  # kernel buffers fill first; then the transport pauses
                if p._conn.paused:
                    break
                p.publish(chunk)
                await asyncio.sleep(0)
            assert p._conn.paused
            task = asyncio.ensure_future(p.request(b"after", timeout=30))
            await until(lambda: p._conn._resume is not None, "the request waiting for resume")
            assert not task.done() and p.pending == 0  # waiting for resume, not sent
            drain = asyncio.ensure_future(p.drain())
            peer.conns[0].transport.resume_reading()
            assert await task == b"re:after"
            await drain

    arun(main())


# --- connecting ---------------------------------------------------------------------------


def test_wrong_expected_address(arun):
    async def main():
        async with Peer() as peer:
            other = BrokerIdentity.generate().address
            with pytest.raises(AddressError, match=f"expected {other}"):
                await Producer(f"{other}@127.0.0.1:{peer.port}").connect()

    arun(main())


def test_bad_welcome_signature(arun):
    async def main():
        async with Peer(sign_nonce=lambda n: bytes(16)) as peer:
            with pytest.raises(AddressError, match="does not verify"):
                await Producer(peer.spec).connect()

    arun(main())


def test_hello_refused(arun):
    def refuse(conn, hello):
        conn.error(0, ErrorCode.HANDSHAKE, "unknown client")
        conn.transport.close()

    async def main():
        async with Peer(on_hello=refuse) as peer:
            with pytest.raises(BrokerError, match="unknown client") as ei:
                await Producer(peer.spec).connect()
            assert ei.value.code == ErrorCode.HANDSHAKE

    arun(main())


def test_no_welcome_and_refused_connection(arun):
    async def main():
        async with Peer(on_hello=lambda conn, hello: None) as peer:
            with pytest.raises(ConnectionLost, match="no WELCOME within 0.5 s"):
                await Producer(peer.spec, timeout=0.5).connect()
        port = free_port()
        with pytest.raises(ConnectionLost, match=f"cannot connect to broker at 127.0.0.1:{port}"):
            await Producer(("127.0.0.1", port)).connect()

    arun(main())


def test_misuse_is_reported():
    with pytest.raises(ValueError):
        Client(":7050", role="both")  # no handler
    with pytest.raises(ValueError):
        Consumer(":7050", lambda d: d, prefetch=0)
    with pytest.raises(ValueError):
        Producer(":7050", timeout=0)
    with pytest.raises(TypeError):
        Producer(7050)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not connected"):
        Producer(":7050").publish(b"x")


# --- consuming ----------------------------------------------------------------------------


def deliveries(*payloads: bytes, first: int = 100) -> list[tuple[int, int, int, bytes]]:
    return [(T.DELIVER, 0, first + i, pl) for i, pl in enumerate(payloads)]


def test_consumer_sync_handler(arun):
    frames = deliveries(b"a", b"b", b"c")
    frames[1] = (T.DELIVER, Flag.REDELIVERED, 101, b"b")

    async def main():
        async with Peer(after_welcome=frames) as peer:
            async with Consumer(peer.spec, lambda d: b"Answer to " + d, prefetch=8, name="c1") as c:
                await until(lambda: len(peer.answers) == 3, "three ANSWERs")
            assert peer.answers == [(0, 100, b"Answer to a"), (0, 101, b"Answer to b"),
                                    (0, 102, b"Answer to c")]
            hello = peer.hellos[0]
            assert hello["role"] == "consumer" and hello["prefetch"] == 8 and hello["name"] == "c1"
            assert c.stats["received"] == 3 and c.stats["answered"] == 3
            assert c.stats["redelivered"] == 1 and c.stats["errors"] == 0
            with pytest.raises(RuntimeError, match="cannot produce"):
                await c.request(b"x")

    arun(main())


RESULTS: dict[bytes, Any] = {
    b"bytes": b"B",
    b"none": None,
    b"str": "\u00fc",
    b"bytearray": bytearray(b"ba"),
    b"memoryview": memoryview(array.array("H", [0x4241])),
    b"wrong-type": 42,
    b"too-big": b"x" * 2000,
}
EXPECTED = {
    100: (0, b"B"),
    101: (Flag.NO_ANSWER, b""),
    102: (0, "\u00fc".encode()),
    103: (0, b"ba"),
    104: (0, memoryview(array.array("H", [0x4241])).tobytes()),
    105: (Flag.NO_ANSWER, b""),
    106: (Flag.NO_ANSWER, b""),
    107: (Flag.NO_ANSWER, b""),
}


@pytest.mark.parametrize("kind", ["sync", "async", "returns-awaitable"])
def test_consumer_answer_normalisation_and_errors(arun, kind, caplog):
    def sync_handler(data: bytes) -> Any:
        if data == b"raise":
            raise RuntimeError("boom")
        return RESULTS[data]

    async def async_handler(data: bytes) -> Any:
        await asyncio.sleep(0)
        return sync_handler(data)

    handler = {"sync": sync_handler, "async": async_handler,
               "returns-awaitable": lambda d: async_handler(d)}[kind]
    frames = deliveries(*RESULTS, b"raise")

    async def main():
        async with Peer(after_welcome=frames, max_payload=1000) as peer:
            async with Consumer(peer.spec, handler, prefetch=len(frames)) as c:
                await until(lambda: len(peer.answers) == len(frames), "every ANSWER")
            assert {fid: (flags, pl) for flags, fid, pl in peer.answers} == EXPECTED
            assert c.stats["received"] == 8 and c.stats["answered"] == 5 and c.stats["errors"] == 3

    with caplog.at_level(logging.ERROR, logger="teomq.consumer"):
        arun(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "teomq.consumer"]
    assert any("delivery 107: handler raised" in m for m in messages)
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert any("handler returned int" in m for m in messages)
    assert any("over the limit of 1000" in m for m in messages)


def test_async_handlers_bounded_by_prefetch(arun):
    frames = deliveries(*(b"m%d" % i for i in range(10)))

    async def main():
        gate = asyncio.Event()
        running = peak = 0

        async def handler(data: bytes) -> bytes:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1
            return data.upper()

        async with Peer(after_welcome=frames) as peer, Consumer(peer.spec, handler, prefetch=4) as c:
            await until(lambda: running == 4 and c.stats["received"] == 10, "4 running handlers")
            assert peer.answers == []
            gate.set()
            await until(lambda: len(peer.answers) == 10, "every ANSWER")
            assert peak == 4
            assert sorted(peer.answers) == [(0, 100 + i, b"M%d" % i) for i in range(10)]

    arun(main())


def test_close_lets_running_handlers_answer(arun):
    async def main():
        gate = asyncio.Event()
        started = asyncio.Event()

        async def handler(data: bytes) -> bytes:
            started.set()
            await gate.wait()
            return b"done"

        async with Peer(after_welcome=deliveries(b"x")) as peer:
            c = Consumer(peer.spec, handler)
            await c.start()
            await started.wait()
            closing = asyncio.ensure_future(c.close())
            await asyncio.sleep(0)
            gate.set()
            await closing
            await c.wait_closed()  # closed by us: no error
            await until(lambda: peer.answers, "the ANSWER")
            assert peer.answers == [(0, 100, b"done")]

    arun(main())


def test_consumer_that_also_produces(arun):
    async def main():
        async with Peer(after_welcome=deliveries(b"d")) as peer:
            async with Consumer(peer.spec, lambda d: d, producer=True, prefetch=2) as c:
                assert await c.request(b"q") == b"re:q"
                await until(lambda: peer.answers, "the ANSWER")
            assert peer.hellos[0]["role"] == "both" and peer.hellos[0]["prefetch"] == 2
            assert peer.answers == [(0, 100, b"d")]

    arun(main())


# --- pure functions -----------------------------------------------------------------------


@given(st.binary(max_size=64), st.sampled_from(["bytes", "bytearray", "memoryview", "strided"]))
def test_to_payload_keeps_the_bytes(data, form):
    obj: Any = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
                "strided": memoryview(data + data)[::2] if data else memoryview(data)}[form]
    expected = (data + data)[::2] if form == "strided" else data
    out = _to_payload(obj)
    assert bytes(out) == expected
    FrameDecoder().feed(encode_frame(T.SEND, 0, 1, out))  # the codec takes it as is
