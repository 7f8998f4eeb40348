"""The command scheme as a library: teomq.Broker(commands=...) with Consumers and Producers in one process.

Every test talks over real TCP sockets on 127.0.0.1 and runs on the stdlib loop and on uvloop
(``arun``). Where a test must see exactly which frames the broker sends (how many REPLYs, the
REDELIVERED flag), a :class:`RawPeer` speaks the wire protocol by hand. Waits poll with a
generous deadline (a hang guard), never a timing assertion.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import teomq
from teomq import BrokerError, UnknownCommand
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.commands import BROKER_COMMANDS, Command, CommandCall, CommandSchema, parse_command_spec
from teomq.protocol import DEFAULT_MAX_PAYLOAD, ErrorCode, Flag, FrameType
from test_broker_api import LONG, assert_idle, make_broker, spec
from waiting import until

pytestmark = pytest.mark.usefixtures("teomq_home")

#: fanout a and c, queue b and q: what most tests run with
SCHEMA = [Command("a"), Command("b", routing="queue"), Command("c"), Command("q", routing="queue")]


def command_broker(tmp_path: Path, commands: Iterable[Command] = SCHEMA, **kw: Any) -> teomq.Broker:
    return make_broker(tmp_path, commands=list(commands), **kw)


def route(broker: teomq.Broker, name: str) -> dict[str, Any]:
    """The broker's command_stats() row of one command."""
    return next(r for r in broker.command_stats() if r["name"] == name)


class Recorder:
    """A consumer's handler that records what it got and answers ``<name>: <data>``.

    ``hold`` (an Event) makes it an async handler that answers only once the event is set
    (an Event nobody sets: it never answers).
    """

    def __init__(self, name: str, hold: asyncio.Event | None = None) -> None:
        self.name = name
        self.got: list[bytes] = []
        self.hold = hold

    def answer(self, data: bytes) -> bytes:
        return f"{self.name}: ".encode() + data

    def sync(self, data: bytes) -> bytes:
        self.got.append(data)
        return self.answer(data)

    async def held(self, data: bytes) -> bytes:
        self.got.append(data)
        assert self.hold is not None
        await self.hold.wait()
        return self.answer(data)

    @property
    def handler(self) -> Callable[[bytes], Any]:
        return self.held if self.hold is not None else self.sync


async def consumer_for(broker: teomq.Broker, rec: Recorder, *commands: str, prefetch: int = 64,
                       **kw: Any) -> teomq.Consumer:
    """A connected consumer with ``rec``'s handler, subscribed to ``commands``."""
    consumer = teomq.Consumer(spec(broker), rec.handler, name=rec.name, prefetch=prefetch, **kw)
    await consumer.connect()
    await consumer.subscribe(*commands)
    return consumer


class RawPeer:
    """A client that speaks the wire protocol by hand, to see every frame the broker sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, welcome: dict[str, Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.welcome = welcome
        self.decoder = FrameDecoder(DEFAULT_MAX_PAYLOAD)
        self.frames: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self.next_ping = 1

    @classmethod
    async def open(cls, broker: teomq.Broker, role: str = "producer", prefetch: int = 8,
                   **hello_extra: Any) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        hello = {"v": 1, "role": role, "name": f"raw-{role}", "prefetch": prefetch, "nonce": b"n" * 16,
                 **hello_extra}
        writer.write(encode_frame(FrameType.HELLO, 0, 0, msgpack.packb(hello)))
        peer = cls(reader, writer, {})
        ftype, _, _, payload = await peer.next_frame()
        assert ftype == FrameType.WELCOME
        peer.welcome = msgpack.unpackb(payload)
        return peer

    def send(self, ftype: int, flags: int, fid: int, payload: bytes = b"") -> None:
        self.writer.write(encode_frame(ftype, flags, fid, payload))

    async def next_frame(self) -> tuple[int, int, int, bytes]:
        while not self.frames:
            data = await self.reader.read(1 << 16)
            assert data, "the broker closed the connection"
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def barrier(self) -> list[tuple[int, int, int, bytes]]:
        """PING, and every frame that came before its PONG: the broker's output for all sent so far."""
        pid = self.next_ping
        self.next_ping += 1
        self.send(FrameType.PING, 0, pid)
        got = []
        while True:
            frame = await self.next_frame()
            if frame[0] == FrameType.PONG and frame[2] == pid:
                return got
            got.append(frame)

    def close(self) -> None:
        self.writer.close()


def error_of(frame: tuple[int, int, int, bytes]) -> tuple[int, str]:
    assert frame[0] == FrameType.ERROR, frame
    doc = msgpack.unpackb(frame[3])
    return doc["code"], doc["reason"]


# -- routing --------------------------------------------------------------------------------------


def test_fanout_reaches_every_subscriber_and_collect_gathers_every_answer(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            recs = [Recorder(n) for n in ("c1", "c2", "c3")]
            consumers = [await consumer_for(broker, r, "a") for r in recs]
            assert route(broker, "a")["subscribers"] == 3
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                seen: list[bytes] = []
                answers = await producer.collect("a/42", expect=3, on_answer=seen.append)
                assert sorted(answers) == [b"c1: a/42", b"c2: a/42", b"c3: a/42"]
                assert seen == answers  # on_answer saw each one as it came, in the same order
                # many at once: every one reaches all three; each producer request gets its own answers
                many = await asyncio.gather(*(producer.collect(f"a/{i}", expect=3) for i in range(20)))
                for i, got in enumerate(many):
                    assert sorted(got) == [f"{c}: a/{i}".encode() for c in ("c1", "c2", "c3")]
                for r in recs:
                    assert r.got == [b"a/42"] + [f"a/{i}".encode() for i in range(20)]  # each in send order
                s = broker.stats()
                assert (s["in"], s["out"], s["answered"], s["dropped"]) == (21, 63, 63, 0), s
                assert (route(broker, "a")["in"], route(broker, "a")["out"]) == (21, 63)
            for c in consumers:
                await c.close()
            assert_idle(broker)

    arun(main())


def test_collect_ends_at_its_timeout_with_what_came(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            never = asyncio.Event()
            holder = await consumer_for(broker, Recorder("holder", never), "a")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                # the only subscriber never answers: the collection ends empty at its timeout
                assert await producer.collect("a/1", timeout=0.2) == []
                assert producer.pending == 0
                # collect() works for a queue command too (one answer comes)
                async with teomq.Consumer(spec(broker), lambda d: b"q: " + d, name="qc") as qc:
                    await qc.subscribe("q")
                    assert await producer.collect("q/1", expect=1) == [b"q: q/1"]
                with pytest.raises(ValueError):
                    await producer.collect("a/2", expect=0)
            never.set()
            await holder.close()

    arun(main())


def test_queue_command_runs_answer_each_message_once(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            release = asyncio.Event()
            recs = [Recorder(n, release) for n in ("x", "y", "z")]
            consumers = [await consumer_for(broker, r, "b") for r in recs]
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                texts = [f"b/{i}" for i in range(48)]
                tasks = [asyncio.ensure_future(producer.request(t)) for t in texts]
                await until(lambda: sum(len(r.got) for r in recs) == 48, "48 deliveries")
                # holding consumers: the split is the broker's alone, a run of 16 (-dispatch-run) each in turn
                assert [r.got for r in recs] == [[t.encode() for t in texts[i:i + 16]] for i in (0, 16, 32)]
                release.set()
                answers = await asyncio.gather(*tasks)
                owner = {d: r.name for r in recs for d in r.got}
                assert answers == [f"{owner[t.encode()]}: {t}".encode() for t in texts]
                assert sorted(d for r in recs for d in r.got) == sorted(t.encode() for t in texts)
            s = broker.stats()
            assert (s["in"], s["out"], s["answered"], s["redelivered"]) == (48, 48, 48, 0), s
            for c in consumers:
                await c.close()
            assert_idle(broker)

    arun(main())


def test_consumers_get_only_the_commands_they_subscribed_to(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            only_a, a_and_b, only_c = Recorder("only_a"), Recorder("a_and_b"), Recorder("only_c")
            consumers = [await consumer_for(broker, only_a, "a"), await consumer_for(broker, a_and_b, "a", "b"),
                         await consumer_for(broker, only_c, "c")]
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                fan_a = [producer.collect(f"a/{i}", expect=2) for i in range(5)]
                queue_b = [producer.request(f"b/{i}") for i in range(5)]
                fan_c = [producer.collect(f"c/{i}", expect=1) for i in range(5)]
                await asyncio.gather(*fan_a, *queue_b, *fan_c)
            a_msgs = [f"a/{i}".encode() for i in range(5)]
            b_msgs = [f"b/{i}".encode() for i in range(5)]
            assert only_a.got == a_msgs
            assert sorted(a_and_b.got) == sorted(a_msgs + b_msgs)
            assert only_c.got == [f"c/{i}".encode() for i in range(5)]
            assert [r["subscribers"] for r in broker.command_stats()] == [2, 1, 1, 0]
            assert broker.stats()["subscriptions"] == 4
            for c in consumers:
                await c.close()
            await until(lambda: broker.stats()["subscriptions"] == 0, "subscriptions ended with their connections")
            assert [r["subscribers"] for r in broker.command_stats()] == [0, 0, 0, 0]

    arun(main())


@pytest.mark.parametrize("name", ["a", "b"])  # fanout, queue
def test_unsubscribe_stops_deliveries(arun: Any, tmp_path: Path, name: str) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            leaver, stayer = Recorder("leaver"), Recorder("stayer")
            lc = await consumer_for(broker, leaver, name)
            sc = await consumer_for(broker, stayer, name)
            await lc.subscribe(name)  # again: OK, nothing changes (one copy per fanout message)
            assert lc.subscriptions == [name]
            assert broker.stats()["subscriptions"] == 2
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                # a fanout copy to each; a queue command's messages in runs of 16, one each
                before = [f"{name}/before{i}" for i in range(6 if name == "a" else 32)]
                if name == "a":
                    await asyncio.gather(*(producer.collect(t, expect=2) for t in before))
                    assert leaver.got == stayer.got == [t.encode() for t in before]
                else:
                    await asyncio.gather(*(producer.request(t) for t in before))
                    assert len(leaver.got) == len(stayer.got) == 16  # one run each
                await lc.unsubscribe(name)
                assert lc.subscriptions == []
                await lc.unsubscribe(name)  # again: OK, nothing to end
                held = list(leaver.got)
                after = [f"{name}/after{i}" for i in range(20)]
                answers = await asyncio.gather(*(producer.request(t) for t in after))
                assert answers == [f"stayer: {t}".encode() for t in after]
                await producer.ping()
                assert leaver.got == held  # nothing after its unsubscribe returned
                assert stayer.got[-20:] == [t.encode() for t in after]
                assert route(broker, name)["subscribers"] == 1
                # and subscribing again brings deliveries back
                await lc.subscribe(name)
                if name == "a":
                    assert sorted(await producer.collect(f"{name}/back", expect=2)) == [
                        f"leaver: {name}/back".encode(), f"stayer: {name}/back".encode()]
                    assert leaver.got[-1] == f"{name}/back".encode()
            await lc.close()
            await sc.close()
            assert_idle(broker)

    arun(main())


def test_unsubscribe_also_ends_backlogged_fanout_copies(arun: Any, tmp_path: Path) -> None:
    """docs/protocol.md: unsubscribe -> 'no more deliveries of <cmd> (those already made stay with it)'."""
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            release = asyncio.Event()
            slow = Recorder("slow", release)
            consumer = await consumer_for(broker, slow, "a", prefetch=1)
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for i in range(3):
                    producer.publish(f"a/{i}")
                await until(lambda: len(slow.got) == 1 and broker.stats()["backlog"] == 2,
                            "one delivered, two waiting for credit")
                await consumer.unsubscribe("a")
                release.set()
                await until(lambda: broker.stats()["inflight"] == 0, "the delivered one answered")
                await producer.ping()
                await consumer.ping()
                assert slow.got == [b"a/0"]
            await consumer.close()

    arun(main())


@pytest.mark.parametrize("routing", ["queue", "fanout"])
def test_a_command_without_subscribers_waits_without_blocking_others(arun: Any, tmp_path: Path,
                                                                     routing: str) -> None:
    async def main() -> None:
        schema = [Command("a", routing="queue"), Command("w", routing=routing)]
        async with command_broker(tmp_path, schema) as broker:
            worker = await consumer_for(broker, Recorder("worker"), "a")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                waiting = [asyncio.ensure_future(producer.request(f"w/{i}")) for i in range(5)]
                await until(lambda: route(broker, "w")["queued"] == 5, "five w waiting")
                assert broker.stats()["queue"] == 5
                # a flows meanwhile
                answers = await asyncio.gather(*(producer.request(f"a/{i}") for i in range(10)))
                assert answers == [f"worker: a/{i}".encode() for i in range(10)]
                assert not any(t.done() for t in waiting)
                assert (route(broker, "w")["queued"], route(broker, "w")["out"]) == (5, 0)
                # a subscriber for w comes: the five are delivered, in order
                late = Recorder("late")
                late_consumer = await consumer_for(broker, late, "w")
                assert await asyncio.gather(*waiting) == [f"late: w/{i}".encode() for i in range(5)]
                assert late.got == [f"w/{i}".encode() for i in range(5)]
                assert (route(broker, "w")["queued"], route(broker, "w")["out"]) == (0, 5)
            await late_consumer.close()
            await worker.close()
            assert_idle(broker)

    arun(main())


# -- consumers that leave ---------------------------------------------------------------------------


def test_queue_messages_of_an_aborted_consumer_are_redelivered(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            never = asyncio.Event()
            stuck = Recorder("stuck", never)
            first = await consumer_for(broker, stuck, "b", "a", prefetch=4)
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.request(f"b/{i}")) for i in range(10)]
                await until(lambda: len(stuck.got) == 4, "stuck holding its prefetch")
                await until(lambda: broker.stats()["in"] == 10, "all ten accepted")
                assert (broker.stats()["inflight"], route(broker, "b")["queued"]) == (4, 6)
                helper = Recorder("helper")
                second = await consumer_for(broker, helper, "b")
                await until(lambda: len(helper.got) == 6, "helper taking the waiting six")
                assert second.stats["redelivered"] == 0
                first._conn._transport.abort()  # gone without a word: its four are in flight
                answers = await asyncio.gather(*tasks)
                assert answers == [f"helper: b/{i}".encode() for i in range(10)]
                # the four came back to the head of b's queue, flagged REDELIVERED
                assert helper.got[6:] == stuck.got
                assert second.stats["redelivered"] == 4
                s = broker.stats()
                assert (s["redelivered"], s["answered"], s["out"], s["dropped"]) == (4, 10, 14, 0), s
                assert route(broker, "b")["subscribers"] == 1
            await second.close()
            never.set()
            await first.close()
            assert_idle(broker)

    arun(main())


def test_redelivery_flag_on_the_wire(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            holder = await RawPeer.open(broker, role="consumer", prefetch=2)
            holder.send(FrameType.SEND, 0, 1, b"subscribe/q")
            assert [(f[0], f[2], f[3]) for f in await holder.barrier()] == [(FrameType.REPLY, 1, b"OK")]
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.request(f"q/{i}")) for i in range(2)]
                first = [await holder.next_frame() for _ in range(2)]
                assert [(f[0], f[1], f[3]) for f in first] == [(FrameType.DELIVER, 0, b"q/0"),
                                                               (FrameType.DELIVER, 0, b"q/1")]
                holder.writer.transport.abort()
                taker = await RawPeer.open(broker, role="consumer", prefetch=2)
                taker.send(FrameType.SEND, 0, 1, b"subscribe/q")
                frames = [await taker.next_frame() for _ in range(2)]
                assert [(f[0], f[2], f[3]) for f in frames if f[0] == FrameType.REPLY] == [(FrameType.REPLY, 1, b"OK")]
                # held when their consumer went: suspects, each delivered alone (docs/semantics.md)
                delivers = [f for f in frames if f[0] != FrameType.REPLY]
                for i in range(2):
                    ((ftype, flags, did, data),) = delivers
                    assert (ftype, flags, data) == (FrameType.DELIVER, Flag.REDELIVERED, b"q/%d" % i)
                    taker.send(FrameType.ANSWER, 0, did, b"re " + data)
                    if i == 0:
                        delivers = [await taker.next_frame()]
                assert await asyncio.gather(*tasks) == [b"re q/0", b"re q/1"]
            taker.close()

    arun(main())


def test_fanout_copies_of_a_consumer_that_leaves_are_dropped(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            never = asyncio.Event()
            stuck = Recorder("stuck", never)
            first = await consumer_for(broker, stuck, "a", prefetch=2)
            other = Recorder("other")
            second = await consumer_for(broker, other, "a")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                tasks = [asyncio.ensure_future(producer.collect(f"a/{i}", expect=1)) for i in range(5)]
                assert await asyncio.gather(*tasks) == [[f"other: a/{i}".encode()] for i in range(5)]
                # stuck holds two copies in flight and three more wait for its credit
                await until(lambda: len(stuck.got) == 2, "stuck holding two copies")
                s = broker.stats()
                assert (s["inflight"], s["backlog"], s["queue"], s["dropped"]) == (2, 3, 0, 0), s
                first._conn._transport.abort()
                await until(lambda: broker.stats()["dropped"] == 5, "stuck's five copies dropped")
                s = broker.stats()
                assert (s["inflight"], s["backlog"], s["queue"], s["redelivered"], s["subscriptions"]) == (
                    0, 0, 0, 0, 1), s
                await producer.ping()
                await second.ping()
                assert other.got == [f"a/{i}".encode() for i in range(5)]  # nothing handed over twice
                assert second.stats["redelivered"] == 0
            await second.close()
            never.set()
            await first.close()
            assert_idle(broker)

    arun(main())


def test_fanout_to_a_slow_prefetch_1_consumer_keeps_every_copy_in_order(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            slow, fast = Recorder("slow"), Recorder("fast")
            gate = asyncio.Event()

            async def sluggish(data: bytes) -> bytes:
                slow.got.append(data)
                await gate.wait()  # holds its one credit until every copy is waiting for it
                return slow.answer(data)

            sc = teomq.Consumer(spec(broker), sluggish, name="slow", prefetch=1)
            await sc.connect()
            await sc.subscribe("a")
            fc = await consumer_for(broker, fast, "a")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                texts = [f"a/{i}" for i in range(40)]
                collecting = [asyncio.ensure_future(producer.collect(t, expect=2)) for t in texts]
                await until(lambda: len(fast.got) == 40, "the fast consumer's 40 copies")
                assert len(slow.got) == 1 and broker.stats()["backlog"] == 39  # kept for the slow one
                gate.set()
                results = await asyncio.gather(*collecting)
                for t, got in zip(texts, results):
                    assert sorted(got) == [f"fast: {t}".encode(), f"slow: {t}".encode()]
            assert slow.got == fast.got == [t.encode() for t in texts]
            assert broker.stats()["dropped"] == 0
            await sc.close()
            await fc.close()
            assert_idle(broker)

    arun(main())


def test_large_fanout_payload_arrives_intact_at_every_subscriber(arun: Any, tmp_path: Path) -> None:
    """Copies share one refcounted payload block; answering (and releasing) some copies must not
    corrupt the others, whether they go out at once, from a backlog, or after a msg/ prefix."""
    size = 64 * 1024

    def body(i: int) -> bytes:
        return hashlib.sha256(b"%d" % i).digest() * (size // 32)

    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            release = asyncio.Event()
            quick = Recorder("quick")
            held = Recorder("held", release)
            trickle = Recorder("trickle", release)

            def digest_answer(rec: Recorder) -> Callable[[bytes], bytes]:
                rec.answer = lambda data: rec.name.encode() + b" " + hashlib.sha256(data).hexdigest().encode()
                return rec.handler

            consumers = []
            for rec, prefetch in ((quick, 64), (held, 64), (trickle, 1)):
                digest_answer(rec)
                consumers.append(await consumer_for(broker, rec, "a", prefetch=prefetch))
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                payloads = [b"a/" + body(i) for i in range(4)]
                tasks = [asyncio.ensure_future(producer.collect(p, expect=3)) for p in payloads]
                await until(lambda: len(quick.got) == 4 and len(held.got) == 4 and len(trickle.got) == 1,
                            "quick answered all, held holding all, trickle holding one")
                assert quick.got == held.got == payloads
                release.set()
                results = await asyncio.gather(*tasks)
                for p, got in zip(payloads, results):
                    digest = hashlib.sha256(p).hexdigest()
                    assert sorted(got) == [f"{n} {digest}".encode() for n in ("held", "quick", "trickle")]
                assert trickle.got == payloads
                # through msg/: the broker strips the prefix, so the forwarded copy is a new frame
                body9 = b"a/" + body(9)
                assert await producer.request(b"msg/" + body9) == b"OK"
                await until(lambda: all(len(r.got) == 5 for r in (quick, held, trickle)), "the msg/ copies")
                assert quick.got[4] == held.got[4] == trickle.got[4] == body9
                await until(lambda: broker.stats()["inflight"] == 0, "every copy answered")
            for c in consumers:
                await c.close()
            assert_idle(broker)

    arun(main())


# -- refusals ---------------------------------------------------------------------------------------


def test_unknown_command_is_refused_and_the_connection_keeps_working(arun: Any, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            worker = await consumer_for(broker, Recorder("w"), "b")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                results = await asyncio.gather(producer.request("b/1"), producer.request("nope/2"),
                                               producer.request("b/3"), producer.request("nope"),
                                               producer.request(""), producer.request("/x"),
                                               return_exceptions=True)
                assert results[0] == b"w: b/1" and results[2] == b"w: b/3"
                for r, name in ((results[1], "nope"), (results[3], "nope"), (results[4], ""), (results[5], "")):
                    assert isinstance(r, BrokerError), r
                    assert (r.code, r.reason) == (ErrorCode.UNKNOWN_COMMAND, f"command '{name}' not found")
                assert producer.connected and producer.stats["refused"] == 4
                # a name is compared whole: prefixes and case do not match
                for text in ("bb/1", "B/1", "b\x00/1"):
                    with pytest.raises(BrokerError) as ei:
                        await producer.request(text)
                    assert ei.value.code == ErrorCode.UNKNOWN_COMMAND
                long_name = "n" * 300
                with pytest.raises(BrokerError) as ei:
                    await producer.request(long_name + "/x")
                assert ei.value.reason == f"command '{'n' * 256}...' not found"
                assert await producer.request("b/still works") == b"w: b/still works"
            s = broker.stats()
            assert (s["unknown_commands"], s["errors"], s["in"]) == (8, 8, 3), s
            await worker.close()

    with caplog.at_level(logging.WARNING, logger="teomq.broker"):
        arun(main())
    refusals = [r.getMessage() for r in caplog.records if r.name == "teomq.broker" and "refused" in r.getMessage()]
    assert len(refusals) == 8
    assert refusals[0].endswith("message #2 refused: command 'nope' not found"), refusals[0]


def test_subscription_refusals(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for call in (producer.subscribe("a"), producer.unsubscribe("a")):
                    with pytest.raises(BrokerError) as ei:
                        await call
                    assert ei.value.code == ErrorCode.NOT_ALLOWED
                    assert "only a consumer can" in ei.value.reason
                # by name, as a message: the same refusal
                with pytest.raises(BrokerError) as ei:
                    await producer.request("subscribe/a")
                assert ei.value.code == ErrorCode.NOT_ALLOWED
                assert producer.subscriptions == []
                assert await producer.hello("still here") == b"Hello still here"

            async with teomq.Consumer(spec(broker), lambda d: d, name="c") as consumer:
                for bad in ("nope", "A"):
                    with pytest.raises(BrokerError) as ei:
                        await consumer.subscribe(bad)
                    assert (ei.value.code, ei.value.reason) == (ErrorCode.UNKNOWN_COMMAND,
                                                                f"command '{bad}' not found")
                with pytest.raises(BrokerError) as ei:
                    await consumer.unsubscribe("nope")
                assert ei.value.code == ErrorCode.UNKNOWN_COMMAND
                for name in BROKER_COMMANDS:
                    for call in (consumer.subscribe, consumer.unsubscribe):
                        with pytest.raises(BrokerError) as ei:
                            await call(name)
                        assert ei.value.code == ErrorCode.NOT_ALLOWED, name
                        assert ei.value.reason == (f"'{name}' is a broker command: nothing to "
                                                   f"{call.__name__}")
                for bad_name in ("", "a/b", 7):
                    with pytest.raises(ValueError):
                        await consumer.subscribe(bad_name)  # type: ignore[arg-type]
                assert consumer.subscriptions == []
                assert broker.stats()["subscriptions"] == 0
                await consumer.subscribe("a")  # the connection is fine
                assert broker.stats()["subscriptions"] == 1

    arun(main())


# -- broker commands and API commands -----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "command"])
def test_api_hello_and_msg(arun: Any, tmp_path: Path, scheme: str) -> None:
    async def main() -> None:
        broker = make_broker(tmp_path) if scheme == "basic" else command_broker(tmp_path)
        async with broker:
            rec = Recorder("c")
            consumer = teomq.Consumer(spec(broker), rec.handler, name="c")
            await consumer.connect()
            if scheme == "command":
                await consumer.subscribe("b")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                assert await producer.call_api("hello", "bob") == b"Hello bob"
                assert await producer.call_api(129, b"") == b"Hello "
                assert await producer.hello("\u00e9t\u00e9") == "Hello \u00e9t\u00e9".encode()
                assert await consumer.hello("consumers too") == b"Hello consumers too"
                # msg: the data is taken as if sent on its own, with NO_REPLY; "OK" comes back
                data = "b/fed" if scheme == "command" else "fed"
                assert await producer.call_api("MSG", data) == b"OK"
                assert await producer.call_api(130, data + "2") == b"OK"
                await until(lambda: len(rec.got) == 2, "the fed messages delivered")
                assert rec.got == [data.encode(), (data + "2").encode()]
                await until(lambda: broker.stats()["inflight"] == 0, "their answers")
                assert producer.stats["replies"] == 5  # the consumer's answers went nowhere
                assert broker.stats()["answered"] == 0
                for bad in ("bye", 132, 128):
                    with pytest.raises(ValueError):
                        await producer.call_api(bad, b"x")
            await consumer.close()
            assert_idle(broker)

    arun(main())


@pytest.mark.parametrize("scheme", ["basic", "command"])
def test_unknown_api_numbers_are_refused(arun: Any, tmp_path: Path, scheme: str) -> None:
    async def main() -> None:
        broker = make_broker(tmp_path) if scheme == "basic" else command_broker(tmp_path)
        async with broker:
            peer = await RawPeer.open(broker)
            peer.send(FrameType.SEND, Flag.API, 1, bytes([132]) + b"x")
            peer.send(FrameType.SEND, Flag.API, 2, b"")
            peer.send(FrameType.SEND, Flag.API, 3, bytes([0]))
            peer.send(FrameType.SEND, Flag.API | Flag.NO_REPLY, 4, bytes([132]))  # refused all the same
            peer.send(FrameType.SEND, Flag.API, 5, bytes([129]) + b"raw")
            frames = await peer.barrier()
            assert [f[2] for f in frames] == [1, 2, 3, 4, 5]
            for f in frames[:4]:
                code, reason = error_of(f)
                assert code == ErrorCode.UNKNOWN_COMMAND
                assert "129 hello" in reason and "130 msg" in reason and "131 dlq" in reason
            assert "API command 132 not found" in error_of(frames[0])[1]
            assert (frames[4][0], frames[4][3]) == (FrameType.REPLY, b"Hello raw")
            # 131 is the dead-letter queue's: a request that is not its msgpack map is refused
            peer.send(FrameType.SEND, Flag.API, 7, bytes([131]) + b"x")
            (dlq,) = await peer.barrier()
            assert error_of(dlq) == (ErrorCode.NOT_ALLOWED, 'dlq: the request is msgpack {"op": list|show|replay|purge, ...}')
            # NO_REPLY: the broker answers nothing
            peer.send(FrameType.SEND, Flag.API | Flag.NO_REPLY, 6, bytes([129]) + b"quiet")
            assert await peer.barrier() == []
            peer.close()
            assert broker.stats()["in"] == 0

    arun(main())


def test_broker_commands_by_name(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            rec = Recorder("c")
            async with teomq.Consumer(spec(broker), rec.handler, name="c") as consumer, \
                    teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                await consumer.subscribe("a")
                assert await producer.request("hello/bob") == b"Hello bob"
                assert await producer.request("hello/a/b/c") == b"Hello a/b/c"
                assert await producer.request("hello") == b"Hello "
                assert await producer.request("msg/a/x") == b"OK"
                assert await producer.request("msg/msg/a/y") == b"OK"
                assert await producer.request("msg/hello/z") == b"Hello z"
                with pytest.raises(BrokerError) as ei:
                    await producer.request("msg/nope/1")
                assert ei.value.code == ErrorCode.UNKNOWN_COMMAND
                await until(lambda: len(rec.got) == 2, "the fed messages")
                assert rec.got == [b"a/x", b"a/y"]
                await until(lambda: broker.stats()["inflight"] == 0, "their answers")
                s = broker.stats()
                assert (s["in"], s["answered"]) == (2, 0), s

    arun(main())


def test_msg_subscribe_subscribes_and_answers_once(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            peer = await RawPeer.open(broker, role="consumer")
            peer.send(FrameType.SEND, 0, 1, b"msg/subscribe/a")
            peer.send(FrameType.SEND, Flag.API, 2, bytes([130]) + b"subscribe/b")
            peer.send(FrameType.SEND, Flag.API, 3, bytes([130]) + b"subscribe/hello")
            frames = await peer.barrier()
            assert [(f[0], f[2], f[3]) for f in frames[:2]] == [(FrameType.REPLY, 1, b"OK"),
                                                                (FrameType.REPLY, 2, b"OK")]
            assert len(frames) == 3 and error_of(frames[2])[0] == ErrorCode.NOT_ALLOWED
            assert broker.stats()["subscriptions"] == 2
            assert broker.stats()["in"] == 0  # nothing was queued
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                task = asyncio.ensure_future(producer.collect("a/1", expect=1))
                ftype, flags, did, data = await peer.next_frame()
                assert (ftype, flags, data) == (FrameType.DELIVER, 0, b"a/1")
                peer.send(FrameType.ANSWER, 0, did, b"raw got it")
                assert await task == [b"raw got it"]
                # unsubscribe through msg too
                peer.send(FrameType.SEND, 0, 4, b"msg/unsubscribe/a")
                assert [(f[0], f[3]) for f in await peer.barrier()] == [(FrameType.REPLY, b"OK")]
                assert await producer.collect("a/2", timeout=0.2) == []
                assert await peer.barrier() == []  # no DELIVER came
            peer.close()

    arun(main())


# -- consumers' side of the scheme --------------------------------------------------------------------


def test_command_handlers_get_parsed_calls(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        schema = [Command("version", "the app's version", "{data}/{description}"),
                  Command("num_players", routing="queue"), Command("m\u00e9t\u00e9o", routing="queue"),
                  Command("other", routing="queue")]
        async with command_broker(tmp_path, schema) as broker:
            calls: list[CommandCall] = []
            fallback: list[bytes] = []
            consumer = teomq.Consumer(spec(broker), lambda d: fallback.append(d) or b"fallback: " + d, name="c")

            @consumer.command("version", "the app's version", pattern="{data}/{description}")
            def version(call: CommandCall) -> str:
                calls.append(call)
                return f"version: 1.0, data: {call.vars['data']}"

            @consumer.command("num_players")
            async def num_players(call: CommandCall) -> bytes:  # async command handlers work too
                calls.append(call)
                await asyncio.sleep(0)
                return b"players: " + call.data

            @consumer.command("m\u00e9t\u00e9o")
            def meteo(call: CommandCall) -> str:
                calls.append(call)
                return f"{call.name}={call.text}"

            assert [c.name for c in consumer.schema] == ["version", "num_players", "m\u00e9t\u00e9o"]
            await consumer.connect()  # subscribes to its commands
            assert consumer.subscriptions == ["version", "num_players", "m\u00e9t\u00e9o"]
            await consumer.subscribe("other")  # no command handler: the constructor's handler answers
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                assert await producer.collect("version/some_data", expect=1) == [b"version: 1.0, data: some_data"]
                assert await producer.collect("version/a/b/c/d", expect=1) == [b"version: 1.0, data: a"]
                assert await producer.request("num_players/42") == b"players: 42"
                assert await producer.request("m\u00e9t\u00e9o/sunny") == "m\u00e9t\u00e9o=sunny".encode()
                assert await producer.request("other/1") == b"fallback: other/1"
            assert [(c.name, dict(c.vars), c.data) for c in calls] == [
                ("version", {"data": "some_data", "description": ""}, b""),
                ("version", {"data": "a", "description": "b"}, b"c/d"),
                ("num_players", {}, b"42"),
                ("m\u00e9t\u00e9o", {}, b"sunny"),
            ]
            assert calls[0].raw == b"version/some_data"
            assert fallback == [b"other/1"]
            await consumer.close()

    arun(main())


def test_consumer_resubscribes_after_reconnect(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with command_broker(tmp_path) as broker:
            got: list[bytes] = []
            consumer = teomq.Consumer(spec(broker), lambda d: got.append(d) or b"by handler", name="c")

            @consumer.command("a")
            def on_a(call: CommandCall) -> str:
                got.append(call.raw)
                return "by command"

            @consumer.command("c", subscribe=False)
            def on_c(call: CommandCall) -> str:
                return "never subscribed"

            await consumer.connect()
            await consumer.subscribe("b")
            assert consumer.subscriptions == ["a", "b"]
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for round_ in range(2):
                    assert await producer.collect(f"a/{round_}", expect=1) == [b"by command"]
                    assert await producer.request(f"b/{round_}") == b"by handler"
                    assert await producer.collect(f"c/{round_}", timeout=0.2) == []
                    assert [r["subscribers"] for r in broker.command_stats()] == [1, 1, 0, 0]
                    await consumer.close()
                    await until(lambda: broker.stats()["subscriptions"] == 0, "subscriptions gone with it")
                    assert not consumer.connected
                    await consumer.connect()  # the same object: subscribes again
                    assert consumer.connected and consumer.subscriptions == ["a", "b"]
                    assert broker.stats()["subscriptions"] == 2
            assert got == [b"a/0", b"b/0", b"a/1", b"b/1"]
            await consumer.close()

    arun(main())


def test_welcome_carries_the_schema_when_hello_asks(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        schema = [Command("version", "the app's version", "{data}/{description}"),
                  Command("num_players", "players online", routing="queue")]
        async with command_broker(tmp_path, schema) as broker:
            # producing clients ask for it (they need to know which commands fan out)
            async with teomq.Producer(spec(broker), name="p") as producer:
                assert producer.commands == schema and producer.scheme == "command"
            async with teomq.Consumer(spec(broker), lambda d: d, name="both", producer=True) as both:
                assert both.commands == schema
            # a consumer-only client does not ask and gets none
            async with teomq.Consumer(spec(broker), lambda d: d, name="c") as consumer:
                assert consumer.commands is None and consumer.scheme == "command"
            asked = await RawPeer.open(broker, commands=True)
            assert asked.welcome["commands"] == [c.as_dict() for c in schema]
            asked.close()
            for hello_extra in ({}, {"commands": False}):
                peer = await RawPeer.open(broker, **hello_extra)
                assert "commands" not in peer.welcome
                peer.close()
        async with make_broker(tmp_path) as basic:
            async with teomq.Producer(spec(basic), name="p") as producer:
                assert producer.commands is None and producer.scheme == "basic"
            peer = await RawPeer.open(basic, commands=True)
            assert "commands" not in peer.welcome
            peer.close()

    arun(main())


def test_subscribing_at_a_basic_scheme_broker_fails_at_once(arun: Any, tmp_path: Path) -> None:
    """No subscribe/<cmd> goes into a basic broker's queue (a consumer would answer it as a message)."""
    async def main() -> None:
        async with make_broker(tmp_path) as basic:
            rec = Recorder("r")
            async with teomq.Consumer(spec(basic), rec.handler, name="r") as consumer:
                with pytest.raises(BrokerError) as err:
                    await consumer.subscribe("a")
                assert err.value.code == ErrorCode.NOT_ALLOWED and "basic scheme" in err.value.reason
                assert consumer.subscriptions == []
            commands = teomq.Consumer(spec(basic), name="cmd")
            commands.command("a")(lambda call: b"x")
            with pytest.raises(BrokerError, match="basic scheme"):
                await commands.connect()
            assert not commands.connected
            await commands.close()
            assert basic.stats()["in"] == 0 and rec.got == []

    arun(main())


def test_a_stuck_fanout_subscriber_holds_up_nobody(arun: Any, tmp_path: Path, caplog: Any) -> None:
    """Past backlog_max its new copies are dropped (and logged); queue_max and producers are untouched."""
    async def main() -> None:
        async with command_broker(tmp_path, queue_max=8, backlog_max=4) as broker:
            stuck = Recorder("stuck", asyncio.Event())  # never answers
            await consumer_for(broker, stuck, "a", prefetch=1)
            other = Recorder("other")
            await consumer_for(broker, other, "a", "b")
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                for i in range(20):  # more than queue_max copies for stuck
                    assert await producer.collect(f"a/{i}", expect=1) == [f"other: a/{i}".encode()]
                s = broker.stats()
                # stuck: 1 in flight + 4 in its backlog; 15 copies dropped; nothing in any queue
                assert (s["backlog"], s["dropped"], s["queue"], s["refused"], s["backpressure"]) == (
                    4, 15, 0, 0, 0), s
                assert await producer.request("b/1") == b"other: b/1"  # other commands flow
                assert stuck.got == [b"a/0"]
        slow = [r for r in caplog.records if "is slow" in r.getMessage()]
        assert len(slow) == 1 and "stuck" in slow[0].getMessage()  # once per episode, not per copy

    with caplog.at_level(logging.WARNING, logger="teomq.broker"):
        arun(main())


# -- many subscriptions ------------------------------------------------------------------------------


def test_ten_thousand_subscriptions_over_two_thousand_commands(arun: Any, tmp_path: Path) -> None:
    """Each command has exactly five of ten subscribers; routing looks only at its own index."""
    n_cmd, n_cons = 2000, 10

    def subscribers(i: int) -> list[int]:
        return [k for k in range(n_cons) if (i * 7 + k) % n_cons < 5]

    async def main() -> None:
        schema = [Command(f"k{i}", routing="queue" if i % 2 else "fanout") for i in range(n_cmd)]
        async with command_broker(tmp_path, schema) as broker:
            recs = [Recorder(f"r{k}") for k in range(n_cons)]
            consumers = []
            for k, rec in enumerate(recs):
                c = teomq.Consumer(spec(broker), rec.handler, name=rec.name, timeout=LONG)
                await c.connect()
                mine = [f"k{i}" for i in range(n_cmd) if k in subscribers(i)]
                # one request each, all in flight at once
                await asyncio.gather(*(c.subscribe(name) for name in mine))
                consumers.append(c)
            assert broker.stats()["subscriptions"] == n_cmd * 5
            assert all(r["subscribers"] == 5 for r in broker.command_stats())
            async with teomq.Producer(spec(broker), name="p", timeout=LONG) as producer:
                sample = list(range(0, n_cmd, 97)) + [n_cmd - 1]
                for i in sample:
                    if i % 2:
                        answer = await producer.request(f"k{i}/x")
                        assert int(answer.split(b":")[0][1:]) in subscribers(i)
                    else:
                        got = await producer.collect(f"k{i}/x", expect=5)
                        assert sorted(int(a.split(b":")[0][1:]) for a in got) == subscribers(i)
                for k, rec in enumerate(recs):
                    assert all(k in subscribers(int(d[1:].split(b"/")[0])) for d in rec.got)
                # half the consumers leave: the others' subscriptions still route
                for c in consumers[::2]:
                    await c.close()
                left = {k for k in range(n_cons) if k % 2}
                expected = sum(len(set(subscribers(i)) & left) for i in range(n_cmd))
                await until(lambda: broker.stats()["consumers"] == len(left), "five consumers gone")
                await until(lambda: broker.stats()["subscriptions"] == expected, "their subscriptions ended")
                assert [r["subscribers"] for r in broker.command_stats()] == [
                    len(set(subscribers(i)) & left) for i in range(n_cmd)]
                for i in sample:
                    mine = sorted(set(subscribers(i)) & left)
                    if not mine:
                        continue
                    if i % 2:
                        answer = await producer.request(f"k{i}/y")
                        assert int(answer.split(b":")[0][1:]) in mine
                    else:
                        got = await producer.collect(f"k{i}/y", expect=len(mine))
                        assert sorted(int(a.split(b":")[0][1:]) for a in got) == mine
            for c in consumers[1::2]:
                await c.close()
            await until(lambda: broker.stats()["subscriptions"] == 0, "every subscription ended")

    arun(main())


# -- schemas ---------------------------------------------------------------------------------------


def test_command_validation() -> None:
    assert Command("x") == Command("x", "", "", "fanout")
    assert Command("v", pattern="{data}/{description}").params == ("data", "description")
    assert Command("v").params == ()
    for kw in ({"name": ""}, {"name": "a/b"}, {"name": "a", "routing": "topic"}, {"name": None}):
        with pytest.raises(ValueError):
            Command(**kw)  # type: ignore[arg-type]
    assert Command("q", "d", "{x}", "queue").as_dict() == {"name": "q", "description": "d", "pattern": "{x}",
                                                           "routing": "queue"}


def test_schema_refuses_reserved_and_duplicate_names() -> None:
    for name in BROKER_COMMANDS:
        with pytest.raises(ValueError, match="broker command"):
            CommandSchema([Command(name)])
        with pytest.raises(ValueError):
            teomq.Broker(commands=[Command(name)])
    # a consumer's own schema may use them
    assert "hello" in CommandSchema([Command("hello")], reserve_broker_names=False)
    with pytest.raises(ValueError):
        CommandSchema([Command("a"), Command("b"), Command("a", routing="queue")])
    schema = CommandSchema([Command("a"), {"name": "b", "routing": "queue", "pattern": "{x}"}])
    schema.add("c", "described", routing="queue")
    with pytest.raises(ValueError):
        schema.add("c")
    with pytest.raises(ValueError):
        schema.add("d", routing="broadcast")
    assert [c.name for c in schema] == ["a", "b", "c"] and len(schema) == 3
    assert schema.get("b") == Command("b", pattern="{x}", routing="queue") and schema.get("z") is None
    assert "a" in schema and b"a" in schema and "z" not in schema and 1 not in schema
    call = schema.parse(b"b/1/rest/of")
    assert (call.name, dict(call.vars), call.data, call.text) == ("b", {"x": "1"}, b"rest/of", "rest/of")
    with pytest.raises(UnknownCommand):
        schema.parse(b"z/1")


def test_schema_file_loading(tmp_path: Path) -> None:
    def write(doc: object, text: str | None = None) -> Path:
        path = tmp_path / "schema.json"
        path.write_text(text if text is not None else json.dumps(doc), encoding="utf-8")
        return path

    good = {"commands": [{"name": "version", "description": "d", "pattern": "{data}/{description}"},
                         {"name": "num_players", "routing": "queue"}]}
    schema = CommandSchema.load(write(good))
    assert list(schema) == [Command("version", "d", "{data}/{description}"), Command("num_players", routing="queue")]
    assert len(CommandSchema.load(write({"commands": []}))) == 0

    bad = [
        (None, "{not json", "not JSON"),
        (["a"], None, "expected"),
        ({"cmds": []}, None, "expected"),
        ({"commands": {"name": "a"}}, None, "expected"),
        ({"commands": ["a"]}, None, "command #1 must be an object"),
        ({"commands": [{"name": "a", "route": "queue"}]}, None, "command #1 must be an object"),
        ({"commands": [{"name": "a"}, {"description": "no name"}]}, None, "command #2"),
        ({"commands": [{"name": "a", "routing": "topic"}]}, None, "command #1: routing"),
        ({"commands": [{"name": "msg"}]}, None, "command #1: 'msg' is a broker command"),
        ({"commands": [{"name": "a"}, {"name": "a"}]}, None, "command #2"),
        ({"commands": [{"name": 5}]}, None, "command #1"),
    ]
    for doc, text, fragment in bad:
        path = write(doc, text)
        with pytest.raises(ValueError) as ei:
            CommandSchema.load(path)
        assert fragment in str(ei.value) and str(path) in str(ei.value), (doc, text, str(ei.value))
    with pytest.raises(OSError):
        CommandSchema.load(tmp_path / "missing.json")


@pytest.mark.parametrize("text,expected", [
    ("num_players", Command("num_players")),
    ("num_players:queue", Command("num_players", routing="queue")),
    ("num_players:fanout", Command("num_players")),
    ("version/{data}/{description}", Command("version", pattern="{data}/{description}")),
    ("version/{data}/{description}:queue", Command("version", pattern="{data}/{description}", routing="queue")),
    ("  padded:queue ", Command("padded", routing="queue")),
    ("v/", Command("v")),
])
def test_parse_command_spec(text: str, expected: Command) -> None:
    assert parse_command_spec(text) == expected


@pytest.mark.parametrize("text", ["", ":queue", "a:", "a:Queue", "a:b:c", "a:topic", "a:queue:queue", "/x", "a b:c:"])
def test_parse_command_spec_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_command_spec(text)
