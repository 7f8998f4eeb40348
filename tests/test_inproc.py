"""In-process endpoints (teomq._core.inproc): the dispatcher delivers to, and takes answers
from, an endpoint inside the broker without wire frames, and it is an endpoint like any
other: held messages go back when it leaves, it subscribes to commands, its session gets
its answers, leases expire for it.

The wire side is a real CoreConnection fed through its read path, whose transport decodes
what the core writes; no event loop is needed (the flush runs inline).
"""

from __future__ import annotations

import msgpack
import pytest

from teomq._core.command_parser import CommandTable
from teomq._core.connection import CoreConnection
from teomq._core.dispatch import Dispatcher
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq._core.inproc import InprocEndpoint
from teomq._core.routes import KINDS
from teomq.protocol import ErrorCode, Flag, FrameType as T


class Transport:
    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 20)
        self.frames: list[tuple[int, int, int, bytes]] = []

    def write(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def of(self, ftype: int) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == ftype]


class Wire(CoreConnection):
    """A wire connection whose handshake is done by hand."""

    def __init__(self, disp: Dispatcher, consumer: bool = False, prefetch: int = 8) -> None:
        self.transport = Transport()
        self.accept_hello(consumer, prefetch)

    def feed(self, *frames: bytes) -> None:
        data = b"".join(frames)
        self.get_buffer(len(data))[:len(data)] = data
        self.buffer_updated(len(data))

    def on_command(self, kind, fid, flags, data):
        raise AssertionError(f"unexpected broker command {kind}")


class Out:
    """on_output of an endpoint: everything it was handed, in order, and per call."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int, bytes]] = []
        self.calls = 0

    def __call__(self, items: list[tuple[int, int, int, bytes]]) -> None:
        self.calls += 1
        self.items.extend(items)

    def of(self, ftype: int) -> list[tuple[int, int, int, bytes]]:
        return [i for i in self.items if i[0] == ftype]


def test_a_wire_producer_is_answered_by_an_inproc_consumer() -> None:
    disp = Dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=4)
    prod = Wire(disp)
    prod.feed(*(encode_frame(T.SEND, 0, i, b"m%d" % i) for i in range(1, 7)))
    # one read: four deliveries (its prefetch), handed over in one call at the flush
    assert out.calls == 1 and [(f, fl, p) for f, fl, _, p in out.items] == [
        (T.DELIVER, 0, b"m1"), (T.DELIVER, 0, b"m2"), (T.DELIVER, 0, b"m3"), (T.DELIVER, 0, b"m4")]
    assert ep.inflight == 4 and ep.credit == 0 and disp.stats()["queue"] == 2
    for _, _, did, payload in list(out.items):
        ep.answer(did, b"re " + payload)
    assert sorted((fid, p) for _, _, fid, p in prod.transport.of(T.REPLY)) == [
        (1, b"re m1"), (2, b"re m2"), (3, b"re m3"), (4, b"re m4")]
    assert [p for _, _, _, p in out.of(T.DELIVER)][4:] == [b"m5", b"m6"]  # credit back: the rest
    for _, _, did, _ in out.of(T.DELIVER)[4:]:
        ep.answer(did, no_answer=True)  # acknowledged, nothing relayed
    s = disp.stats()
    assert (s["in"], s["out"], s["answered"], s["queue"], s["inflight"]) == (6, 6, 4, 0, 0)
    assert len(prod.transport.of(T.REPLY)) == 4 and not prod.transport.of(T.ERROR)


def test_an_inproc_producer_is_answered_by_a_wire_consumer() -> None:
    disp = Dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out)  # prefetch 0: a producer only, never delivered to
    cons = Wire(disp, consumer=True)
    ep.send(41, b"question")
    ep.send(42, b"quiet", no_reply=True)
    (_, flags, did, payload), (_, _, did2, _) = cons.transport.of(T.DELIVER)
    assert (flags, payload) == (0, b"question")
    cons.feed(encode_frame(T.ANSWER, 0, did, b"answer"), encode_frame(T.ANSWER, 0, did2, b"unheard"))
    assert out.items == [(T.REPLY, 0, 41, b"answer")]
    assert not ep.consumer and ep.inflight == 0


def test_what_an_inproc_consumer_held_goes_back_when_it_closes() -> None:
    disp = Dispatcher()
    first, second = Out(), Out()
    ep = InprocEndpoint(disp, first, prefetch=2)
    prod = Wire(disp)
    prod.feed(*(encode_frame(T.SEND, 0, i, b"m%d" % i) for i in range(1, 4)))
    assert [p for *_, p in first.items] == [b"m1", b"m2"]
    ep.close()
    ep.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ep.answer(first.items[0][2], b"too late")
    other = InprocEndpoint(disp, second, prefetch=8)
    assert [(fl, p) for _, fl, _, p in second.items] == [
        (Flag.REDELIVERED, b"m1"), (Flag.REDELIVERED, b"m2"), (0, b"m3")]
    assert disp.stats()["redelivered"] == 2 and other.inflight == 3


def test_an_unknown_delivery_id_is_an_error_to_the_endpoint() -> None:
    disp = Dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=1)
    ep.answer(12345, b"x")
    assert len(out.items) == 1 and out.items[0][:3] == (T.ERROR, 0, 12345)
    assert msgpack.unpackb(out.items[0][3])["code"] == ErrorCode.UNKNOWN_ID
    assert disp.stats()["unknown_answers"] == 1


def test_an_inproc_consumer_subscribes_to_commands() -> None:
    disp = Dispatcher()
    table = CommandTable()
    kinds = []
    for name, kind in (("work", "queue"), ("news", "fanout"), ("subscribe", "subscribe")):
        table.add(name)
        kinds.append(KINDS[kind])
    disp.set_schema(table, kinds)
    out, other = Out(), Out()
    ep = InprocEndpoint(disp, out, prefetch=8)
    ep2 = InprocEndpoint(disp, other, prefetch=8)
    assert disp.subscribe(ep, "work") == 0 and disp.subscribe(ep, "news") == 0
    assert disp.subscribe(ep2, "news") == 0 and disp.subscribe(ep, "subscribe") == -2
    assert sorted(disp.subscriptions_of(ep)) == [b"news", b"work"]
    prod = Wire(disp)
    prod.feed(encode_frame(T.SEND, 0, 1, b"work/job"), encode_frame(T.SEND, 0, 2, b"news/flash"))
    assert [p for *_, p in out.items] == [b"work/job", b"news/flash"]
    assert [p for *_, p in other.items] == [b"news/flash"]  # a copy each
    assert disp.unsubscribe(ep, "work") == 0
    prod.feed(encode_frame(T.SEND, 0, 3, b"work/later"))
    assert len(out.items) == 2 and disp.stats()["queue"] == 1  # nobody takes work now: it waits


def test_a_session_name_is_held_by_one_endpoint_at_a_time() -> None:
    disp = Dispatcher()
    ep = InprocEndpoint(disp, Out(), session=b"s-1")
    assert disp.session_of(b"s-1") is ep and ep.session_name == b"s-1" and ep.session
    with pytest.raises(ValueError, match="already connected"):
        InprocEndpoint(disp, Out(), session=b"s-1")
    assert disp.stats()["connections"] == 1  # the refused one left no trace
    ep.close()
    assert disp.session_of(b"s-1") is None
    again = InprocEndpoint(disp, Out(), session=b"s-1")
    assert disp.session_of(b"s-1") is again and again.session != ep.session  # a new session


def test_an_answer_for_a_session_that_is_gone_is_orphaned() -> None:
    disp = Dispatcher()
    out = Out()
    cons = InprocEndpoint(disp, out, prefetch=4)
    prod = Wire(disp)
    prod.feed(encode_frame(T.SEND, 0, 9, b"asked"))
    prod.detach()
    # a new connection may get the same slot: the answer still must not reach it
    newcomer = Wire(disp)
    assert newcomer.slot == prod.slot and newcomer.session != prod.session
    cons.answer(out.items[0][2], b"answer")
    assert not newcomer.transport.of(T.REPLY)
    assert disp.stats()["orphaned"] == 1 and disp.stats()["answered"] == 0


def test_a_lease_that_expires_returns_the_message_and_keeps_the_credit() -> None:
    disp = Dispatcher(lease=5.0)
    hung, fine = Out(), Out()
    slow = InprocEndpoint(disp, hung, prefetch=1)
    prod = Wire(disp)
    prod.feed(encode_frame(T.SEND, 0, 1, b"job"))
    ((_, _, did, _),) = hung.items
    disp.tick(4.9)
    assert slow.inflight == 1 and disp.stats()["expired"] == 0
    InprocEndpoint(disp, fine, prefetch=1)
    disp.tick(5.0)  # the lease ran out: back to the queue, to the next consumer
    assert slow.inflight == 0 and slow.lapsed == 1 and slow.credit == 0
    ((_, flags, did2, payload),) = fine.items
    assert (flags, payload) == (Flag.REDELIVERED, b"job")
    slow.answer(did, b"late")  # refused, and the slow consumer's credit comes back
    assert hung.items[-1][0] == T.ERROR and slow.credit == 1 and slow.lapsed == 0
    assert not prod.transport.of(T.REPLY)
    s = disp.stats()
    assert (s["expired"], s["redelivered"], s["unknown_answers"], s["inflight"]) == (1, 1, 1, 1)
