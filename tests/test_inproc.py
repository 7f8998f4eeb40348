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
from teomq._core.inproc import PUSHES, InprocEndpoint, PushCache, release_held_many
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


def fanout_dispatcher() -> Dispatcher:
    disp = Dispatcher()
    table = CommandTable()
    table.add("news")
    disp.set_schema(table, [KINDS["fanout"]])
    return disp


def news_subscribers(disp: Dispatcher, n: int, prefetch: int) -> tuple[list[Out], list[InprocEndpoint]]:
    """``n`` in-process consumers subscribed to the fanout command news, and their outputs."""
    outs = [Out() for _ in range(n)]
    eps = [InprocEndpoint(disp, o, prefetch=prefetch) for o in outs]
    for ep in eps:
        assert disp.subscribe(ep, "news") == 0
    return outs, eps


def test_fanout_copies_share_one_payload_object_per_message() -> None:
    # the payload's bytes object is made once per message, not once per in-process delivery
    disp = fanout_dispatcher()
    outs, _ = news_subscribers(disp, 3, prefetch=8)
    prod = Wire(disp)
    prod.feed(encode_frame(T.SEND, 0, 1, b"news/one"), encode_frame(T.SEND, 0, 2, b"news/two"))
    firsts, seconds = [o.items[0][3] for o in outs], [o.items[1][3] for o in outs]
    assert firsts == [b"news/one"] * 3 and seconds == [b"news/two"] * 3
    assert all(p is firsts[0] for p in firsts) and all(p is seconds[0] for p in seconds)
    # two dispatchers in turn, each message the first (sequence number 1) of its own dispatcher
    for text in (b"news/a", b"news/b"):
        d = fanout_dispatcher()
        (out,), _ = news_subscribers(d, 1, prefetch=8)
        Wire(d).feed(encode_frame(T.SEND, 0, 1, text))
        assert d.stats()["last_seq"] == 1 and [i[3] for i in out.items] == [text]


def test_copies_from_backlogs_share_the_payload_object_too() -> None:
    # prefetch 1: every copy after the first waits in its subscriber's backlog and is delivered
    # as that subscriber acknowledges, one subscriber's whole backlog after another's
    disp = fanout_dispatcher()
    outs, eps = news_subscribers(disp, 3, prefetch=1)
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, b"news/%d" % i) for i in range(1, 6)))
    for ep, out in zip(eps, outs):  # all of one backlog, then the next: messages interleave
        for _ in range(4):
            ep.ack([out.items[-1][2]])
    got = [[i[3] for i in o.items] for o in outs]
    assert got == [[b"news/%d" % i for i in range(1, 6)]] * 3
    for k in range(5):
        assert outs[1].items[k][3] is outs[0].items[k][3] is outs[2].items[k][3]


def test_a_run_ends_when_its_consumer_goes_and_credit_bounds_it() -> None:
    # runs of 4 (Dispatcher(run=4)); the head leaves mid-run: the next consumer's run begins
    disp = Dispatcher(run=4)
    outs = [Out() for _ in range(3)]
    eps = [InprocEndpoint(disp, o, prefetch=p) for o, p in zip(outs, (100, 100, 2))]
    prod = Wire(disp)
    prod.feed(*(encode_frame(T.SEND, 0, i, f"m{i}".encode()) for i in range(1, 3)))
    assert [i[3] for i in outs[0].items] == [b"m1", b"m2"]  # its run of 4 half done
    eps[0].close()  # what it held goes back to the head of the queue, flagged redelivered
    prod.feed(*(encode_frame(T.SEND, 0, i, f"m{i}".encode()) for i in range(3, 11)))
    got = [[i[3] for i in o.items] for o in outs[1:]]
    # b: a run of 4 (m1, m2 again, then m3, m4); c: its 2 of credit; b again: the rest
    assert got == [[b"m1", b"m2", b"m3", b"m4", b"m7", b"m8", b"m9", b"m10"], [b"m5", b"m6"]]
    assert [i[1] & Flag.REDELIVERED for i in outs[1].items[:3]] == [Flag.REDELIVERED, Flag.REDELIVERED, 0]


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


def test_ack_acknowledges_many_deliveries_with_one_pump_and_one_flush() -> None:
    disp = Dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=4)
    prod = Wire(disp)
    prod.feed(*(encode_frame(T.SEND, 0, i, b"m%d" % i) for i in range(1, 11)))
    assert out.calls == 1 and len(out.items) == 4
    ep.ack([did for _, _, did, _ in out.items])
    # the four credits back at once: the next four in one hand-over, nothing relayed to the producer
    assert out.calls == 2 and [p for *_, p in out.items[4:]] == [b"m5", b"m6", b"m7", b"m8"]
    assert not prod.transport.of(T.REPLY) and ep.inflight == 4
    ep.ack([out.items[4][2], 424242, out.items[5][2]])  # an unknown id: an error for it, the others done
    assert out.calls == 3
    ((_, _, fid, payload),) = out.of(T.ERROR)
    assert fid == 424242 and msgpack.unpackb(payload)["code"] == ErrorCode.UNKNOWN_ID
    assert [p for *_, p in out.of(T.DELIVER)[8:]] == [b"m9", b"m10"]
    ep.ack([])  # nothing to do
    s = disp.stats()
    assert (s["in"], s["out"], s["answered"], s["unknown_answers"], s["inflight"]) == (10, 10, 0, 1, 4)
    ep.close()
    with pytest.raises(RuntimeError, match="closed"):
        ep.ack([1])


def test_an_api_send_is_fed_in_or_answered_by_the_broker() -> None:
    """api=True is a SEND flagged API: 130 msg feeds the rest in (answered OK), 129 hello and
    unknown numbers are broker commands, which a bare endpoint is refused."""
    disp = Dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out)
    cons = Wire(disp, consumer=True)
    ep.send(1, bytes([130]) + b"fed", api=True)
    assert [(f[0], f[3]) for f in cons.transport.of(T.DELIVER)] == [(T.DELIVER, b"fed")]
    assert out.items == [(T.REPLY, 0, 1, b"OK")]
    ep.send(2, bytes([129]) + b"me", api=True)
    ep.send(3, bytes([7]), api=True)
    assert [(f, fid, msgpack.unpackb(p)["code"]) for f, _, fid, p in out.items[1:]] == [
        (T.ERROR, 2, ErrorCode.NOT_ALLOWED), (T.ERROR, 3, ErrorCode.NOT_ALLOWED)]
    assert len(cons.transport.of(T.DELIVER)) == 1 and disp.stats()["in"] == 1


def test_a_held_back_inproc_producer_parks_its_sends_and_release_accepts_them_in_order() -> None:
    disp = Dispatcher()
    out = Out()
    prod = InprocEndpoint(disp, out)
    cons = Wire(disp, consumer=True)
    prod.hold_sends = True
    prod.send(1, b"a")
    prod.send(2, bytes([130]) + b"b", api=True)
    prod.send(3, b"c", no_reply=True)
    assert prod.parked_sends == 3 and disp.parked_bytes == 3 * 24 + 1 + 2 + 1
    assert disp.stats()["in"] == 0 and not cons.transport.frames and not out.items
    # let go, and held again by the first message accepted: the rest stays parked, in order
    disp.on_message = lambda conn, msg_id, payload: setattr(prod, "hold_sends", True)
    prod.hold_sends = False
    prod.release_sends()
    assert [f[3] for f in cons.transport.of(T.DELIVER)] == [b"a"]
    assert prod.parked_sends == 2 and disp.parked_bytes == 2 * 24 + 2 + 1
    prod.send(4, b"d")  # parked behind them
    disp.on_message = None
    prod.hold_sends = False
    prod.release_sends()
    assert [f[3] for f in cons.transport.of(T.DELIVER)] == [b"a", b"b", b"c", b"d"]
    assert prod.parked_sends == 0 and disp.parked_bytes == 0
    assert out.items == [(T.REPLY, 0, 2, b"OK")]  # msg is answered OK when accepted
    for _, _, did, payload in cons.transport.of(T.DELIVER):
        cons.feed(encode_frame(T.ANSWER, 0, did, b"re " + payload))
    assert [(fid, p) for _, _, fid, p in out.of(T.REPLY)] == [(2, b"OK"), (1, b"re a"), (4, b"re d")]
    # what is parked when it closes is dropped, never accepted
    prod.hold_sends = True
    prod.send(5, b"e")
    prod.close()
    assert disp.parked_bytes == 0 and prod.parked_sends == 0 and disp.stats()["in"] == 4


def test_an_inproc_producers_parked_sends_are_bounded() -> None:
    """Past the bound of a connection's parked frames (64 MiB here) a send is refused QUEUE_FULL."""
    disp = Dispatcher(max_payload=22 << 20)
    out = Out()
    prod = InprocEndpoint(disp, out)
    prod.hold_sends = True
    big = b"x" * (22 << 20)
    for i in range(1, 4):
        prod.send(i, big)
    assert prod.parked_sends == 2 and prod.n_refused_parked == 1 and prod.n_refused == 0
    ((ftype, _, fid, payload),) = out.items
    err = msgpack.unpackb(payload)
    assert (ftype, fid, err["code"]) == (T.ERROR, 3, ErrorCode.QUEUE_FULL) and "held back" in err["reason"]
    assert disp.stats()["refused"] == 1
    prod.close()
    assert disp.parked_bytes == 0


def test_put_output_queues_behind_what_is_pending_and_flush_now_hands_it_over() -> None:
    later: list = []
    disp = Dispatcher(scheduler=later.append)  # flushes wait for disp.flush()
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=4)
    prod = Wire(disp)
    prod.feed(encode_frame(T.SEND, 0, 1, b"m1"))
    ep.put_output(T.REPLY, 0, 7, b"yes")
    ep.put_output(T.ERROR, 0, 8)
    assert out.calls == 0
    ep.flush_now()
    assert out.calls == 1 and [(f, fid, p) for f, _, fid, p in out.items] == [
        (T.DELIVER, out.items[0][2], b"m1"), (T.REPLY, 7, b"yes"), (T.ERROR, 8, b"")]
    disp.flush()
    assert out.calls == 1  # nothing was left
    ep.close()
    ep.put_output(T.REPLY, 0, 9, b"too late")  # an endpoint that is gone hands nothing over
    ep.flush_now()
    disp.flush()
    assert out.calls == 1


# -- stream pushes taken in C (set_pushes: the web gateway's sessions) --------------------------

class Encoder:
    """A PushCache's encode: the command name and a recognisable push, every call counted."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> tuple[bytes, bytes]:
        self.calls.append(payload)
        return payload.split(b"/", 1)[0], b"<" + payload + b">"


def two_command_dispatcher() -> Dispatcher:
    disp = Dispatcher()
    table = CommandTable()
    table.add("news")
    table.add("sport")
    disp.set_schema(table, [KINDS["fanout"], KINDS["fanout"]])
    return disp


def news_pushers(disp: Dispatcher, n: int, prefetch: int) -> tuple[Encoder, list[Out], list[InprocEndpoint]]:
    """news_subscribers whose news deliveries are taken as Stream pushes, through one PushCache."""
    enc = Encoder()
    cache = PushCache(enc)
    outs, eps = news_subscribers(disp, n, prefetch)
    for ep in eps:
        ep.set_pushes(cache, {b"news"})
    return enc, outs, eps


def test_stream_pushes_are_encoded_once_per_message_handed_over_joined_and_held_for_acks() -> None:
    disp = fanout_dispatcher()
    enc, outs, eps = news_pushers(disp, 3, prefetch=8)
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, b"news/%d" % i) for i in range(1, 4)))
    assert enc.calls == [b"news/1", b"news/2", b"news/3"]      # once each, not once per subscriber
    for out, ep in zip(outs, eps):
        assert out.items == [(PUSHES, 3, 0, b"<news/1><news/2><news/3>")] and out.calls == 1
        assert ep.n_held == 3 and ep.inflight == 3             # not acknowledged until released
    assert eps[0].release_held(2) == 2 and eps[0].n_held == 1 and eps[0].inflight == 1
    assert eps[0].release_held(100) == 1 and eps[0].n_held == 0 and eps[0].inflight == 0
    assert eps[0].release_held(100) == 0


def test_a_delivery_outside_the_streams_or_too_large_comes_as_a_tuple_in_order() -> None:
    disp = two_command_dispatcher()
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=16)
    assert disp.subscribe(ep, "news") == 0 and disp.subscribe(ep, "sport") == 0
    ep.set_pushes(PushCache(Encoder()), {b"news"})
    big = b"news/" + b"x" * 20_000
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, p) for i, p in enumerate(
        [b"news/1", b"news/2", b"sport/1", b"news/3", big, b"news/4"], 1)))
    kinds = [(i[0], i[1]) if i[0] == PUSHES else (i[0], i[3][:7]) for i in out.items]
    assert kinds == [(PUSHES, 2), (T.DELIVER, b"sport/1"), (PUSHES, 1), (T.DELIVER, b"news/xx"), (PUSHES, 1)]
    assert [i[3] for i in out.items if i[0] == PUSHES] == [b"<news/1><news/2>", b"<news/3>", b"<news/4>"]
    # a name added to the set later is pushed from then on: the set is the session's own, not a copy
    streams = {b"news"}
    ep.set_pushes(PushCache(Encoder()), streams)
    streams.add(b"sport")
    out.items.clear()
    Wire(disp).feed(encode_frame(T.SEND, 0, 9, b"sport/2"))
    assert out.items == [(PUSHES, 1, 0, b"<sport/2>")]
    # and back to a tuple per delivery
    ep.set_pushes(None, None)
    out.items.clear()
    Wire(disp).feed(encode_frame(T.SEND, 0, 10, b"news/5"))
    assert [(i[0], i[3]) for i in out.items] == [(T.DELIVER, b"news/5")]
    with pytest.raises(TypeError):
        ep.set_pushes(PushCache(Encoder()), [b"news"])
    with pytest.raises(TypeError):
        PushCache(None)


def test_output_queued_after_pushes_comes_after_them() -> None:
    disp = fanout_dispatcher()
    _, (out,), (ep,) = news_pushers(disp, 1, prefetch=8)
    disp.outbox.set_scheduler(lambda cb: None)  # hold the flush: everything below is one pass
    Wire(disp).feed(encode_frame(T.SEND, 0, 1, b"news/1"))
    ep.put_output(T.ERROR, 0, 7, b"e")
    Wire(disp).feed(encode_frame(T.SEND, 0, 2, b"news/2"))
    ep.flush_now()
    assert out.items == [(PUSHES, 1, 0, b"<news/1>"), (T.ERROR, 0, 7, b"e"), (PUSHES, 1, 0, b"<news/2>")]


def test_held_ids_of_a_closed_endpoint_are_dropped_with_what_it_held() -> None:
    disp = Dispatcher()  # the basic scheme's queue: what it held goes back
    out = Out()
    ep = InprocEndpoint(disp, out, prefetch=4)
    ep.set_pushes(PushCache(lambda p: (b"", b"[" + p + b"]")), {b""})  # every name: the whole payload
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, b"m%d" % i) for i in range(1, 4)))
    assert out.items == [(PUSHES, 3, 0, b"[m1][m2][m3]")] and ep.n_held == 3
    ep.close()
    assert ep.n_held == 0 and ep.release_held(10) == 0
    assert disp.stats()["queue"] == 3  # requeued for the next consumer
    out2 = Out()
    InprocEndpoint(disp, out2, prefetch=4)
    assert [i[3] for i in out2.items] == [b"m1", b"m2", b"m3"]


def test_backlogs_longer_than_the_cache_still_push_every_message_right() -> None:
    # prefetch 1: copies wait in backlogs and come one per acknowledgement, long after 64 newer
    # messages took their cache slots: they are encoded again, never mixed up
    disp = fanout_dispatcher()
    enc, outs, eps = news_pushers(disp, 2, prefetch=1)
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, b"news/%d" % i) for i in range(1, 101)))
    for ep in eps:
        while ep.release_held(1):
            pass
    for out in outs:
        assert b"".join(i[3] for i in out.items) == b"".join(b"<news/%d>" % i for i in range(1, 101))
    assert 100 <= len(enc.calls) < 200


def test_release_held_many_feeds_endpoints_in_turn_within_the_budget() -> None:
    disp = fanout_dispatcher()
    _, outs, eps = news_pushers(disp, 4, prefetch=4)
    Wire(disp).feed(*(encode_frame(T.SEND, 0, i, b"news/%d" % i) for i in range(1, 11)))
    assert [ep.n_held for ep in eps] == [4, 4, 4, 4]    # 4 each pushed (their credit), 6 each backlogged
    eps[1].close()                                       # closed: passed over
    # a budget of 6: all of the first (4), none of the closed one, 2 of the third, which is next
    fed, stop, error = release_held_many([eps[0], None, eps[1], eps[2], eps[3]], 0, 6)
    assert (fed, stop, error) == (6, 3, None)
    # the credit given back brings backlogged copies at once, their ids held after the rest
    assert [eps[0].n_held, eps[2].n_held, eps[3].n_held] == [4, 2 + 2, 4]
    assert [len(b"".join(i[3] for i in o.items)) // len(b"<news/1>") for o in (outs[0], outs[2], outs[3])] == [8, 6, 4]
    # from where it stopped, a budget for everything: the third's 4, the fourth's 4
    fed, stop, error = release_held_many([eps[0], None, eps[1], eps[2], eps[3]], 3, 100)
    assert (fed, stop, error) == (8, 5, None)
    assert [eps[2].n_held, eps[3].n_held] == [4, 4]   # the rest of their backlogs (4 each), just pushed
    with pytest.raises(TypeError):
        release_held_many(["not an endpoint"], 0, 1)
    with pytest.raises(ValueError):
        release_held_many([], -1, 1)
