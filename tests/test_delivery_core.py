"""Leases, nacks and backoff, dead letters, deadlines and cancellation in the compiled
Dispatcher, on a deterministic clock (``Dispatcher.tick(now)``; no sleeping, no event loop).

Connections are ``FakeConn`` (test_dispatch_state): frames go in through the core's real read
path and what it writes is decoded (CRCs verified) by a fake transport. docs/semantics.md is
what is held here; tests/test_delivery.py holds the same through the real CLI.
"""

from __future__ import annotations

import msgpack
import pytest
from test_dispatch_state import FakeConn

from teomq._core.dispatch import Dispatcher
from teomq._core.frame_codec import encode_frame
from teomq.protocol import ErrorCode, Flag, FrameType as T

DELIVER, REPLY, ERROR, CANCEL = int(T.DELIVER), int(T.REPLY), int(T.ERROR), int(T.CANCEL)


class Peer:
    """One FakeConn with its own frame helpers."""

    def __init__(self, disp: Dispatcher, cid: int, role: str, prefetch: int = 8, *, caps: bool = True) -> None:
        self.conn = FakeConn(disp, cid)
        self.conn.log_name = f"c{cid}".encode()
        self.conn.leases = caps     # as Broker does for a HELLO that names "lease" and "cancel"
        self.conn.cancels = caps
        self.feed(encode_frame(T.HELLO, 0, 0, msgpack.packb({"role": role, "prefetch": prefetch})))
        first = self.conn.transport.frames
        assert first[0][0] == T.WELCOME
        del first[0]  # what the HELLO made possible stays for frames()

    def feed(self, data: bytes) -> None:
        buf = self.conn.get_buffer(len(data))
        buf[:len(data)] = data
        self.conn.buffer_updated(len(data))

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        return self.conn.transport.take()

    def of(self, ftype: int) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames() if f[0] == ftype]

    def send(self, mid: int, payload: bytes, flags: int = 0, deadline_ms: int | None = None) -> None:
        if deadline_ms is not None:
            flags |= Flag.DEADLINE
            payload = deadline_ms.to_bytes(4, "little") + payload
        self.feed(encode_frame(T.SEND, flags, mid, payload))

    def answer(self, did: int, payload: bytes = b"ok", flags: int = 0) -> None:
        self.feed(encode_frame(T.ANSWER, flags, did, payload))

    def nack(self, did: int, delay: float | None = None, error: str | None = None) -> None:
        self.answer(did, msgpack.packb({"delay": delay, "error": error}), Flag.RETRY)

    def reject(self, did: int, reason: str) -> None:
        self.answer(did, msgpack.packb({"reason": reason}), Flag.REJECT)

    def touch(self, *dids: int) -> None:
        self.feed(encode_frame(T.TOUCH, 0, 0, b"".join(d.to_bytes(8, "little") for d in dids)))


def errors(frames: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int]]:
    """(message id, code) of each ERROR."""
    return [(f[2], msgpack.unpackb(f[3])["code"]) for f in frames if f[0] == ERROR]


def make(lease: float = 10.0, **delivery: float) -> tuple[Dispatcher, list[list[dict]]]:
    disp = Dispatcher(queue_max=1000)
    disp.set_delivery(lease=lease, **delivery)
    dead: list[list[dict]] = []
    disp.on_dead = dead.append
    disp.tick(0.0)
    return disp, dead


def test_an_expired_lease_gives_the_message_to_another_consumer_and_refuses_the_late_answer() -> None:
    disp, _ = make(lease=10.0)
    prod = Peer(disp, 1, "producer")
    slow = Peer(disp, 2, "consumer", prefetch=4)
    prod.send(1, b"m1")
    ((_, flags, did, payload),) = slow.of(DELIVER)
    assert (flags & Flag.REDELIVERED, flags >> 8, payload) == (0, 1, b"m1")  # attempt 1 in bits 8-15
    disp.tick(9.99)
    assert slow.frames() == [] and disp.stats()["inflight"] == 1
    fast = Peer(disp, 3, "consumer")
    fast.answer(0)  # (an answer of nothing it holds: proven? no; UNKNOWN_ID)
    assert errors(fast.frames()) == [(0, ErrorCode.UNKNOWN_ID)]
    disp.tick(10.0)
    ((_, flags, did2, payload),) = fast.of(DELIVER)
    assert payload == b"m1" and flags & Flag.REDELIVERED and flags >> 8 == 2
    # the consumer that let it expire gets nothing new until it answers something
    prod.send(2, b"m2")
    assert [f[3] for f in fast.of(DELIVER)] == [b"m2"] and slow.frames() == []
    # slow never answered anything: no evidence against the message, its lapse is not a crash
    assert disp.stats()["expired"] == 1 and disp.stats()["crashed"] == 0
    slow.answer(did, b"late")
    assert errors(slow.frames()) == [(did, ErrorCode.LEASE_EXPIRED)]
    assert prod.frames() == []  # the late answer never reaches the producer
    fast.answer(did2, b"from fast")
    assert [(f[2], f[3]) for f in prod.of(REPLY)] == [(1, b"from fast")]
    prod.send(3, b"m3")  # its credit is back: it takes its turn again
    assert [f[3] for f in slow.of(DELIVER) + fast.of(DELIVER)] == [b"m3"]


def test_touch_keeps_a_lease_and_ids_it_does_not_hold_are_ignored() -> None:
    disp, _ = make(lease=10.0)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    other = Peer(disp, 3, "consumer")
    prod.send(1, b"m1")
    dids = [f[2] for f in c.of(DELIVER) + other.of(DELIVER)]
    holder = c if disp.stats()["inflight"] and c.conn.inflight else other
    disp.tick(8.0)
    holder.touch(dids[0], 12345)  # the second is nobody's
    (c if holder is other else other).touch(dids[0])  # not its delivery: ignored
    assert disp.stats()["touched"] == 1
    disp.tick(17.9)
    assert disp.stats()["expired"] == 0
    disp.tick(18.0)
    assert disp.stats()["expired"] == 1


def test_retry_with_a_delay_comes_back_after_it_behind_the_others() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer", prefetch=1)
    prod.send(1, b"m1")
    ((_, _, did, _),) = c.of(DELIVER)
    prod.send(2, b"m2")
    prod.send(3, b"m3")
    c.nack(did, delay=2.0)
    ((_, _, did, payload),) = c.of(DELIVER)
    assert payload == b"m2"  # it went behind; m2 was waiting
    disp.tick(1.99)
    c.answer(did)
    ((_, _, did, payload),) = c.of(DELIVER)
    assert payload == b"m3"  # m1 is not due yet
    c.answer(did)
    assert c.frames() == [] and disp.stats()["delayed"] == 1 and disp.stats()["held"] == 1
    disp.tick(2.0)
    ((_, flags, did, payload),) = c.of(DELIVER)
    assert payload == b"m1" and flags & Flag.REDELIVERED and flags >> 8 == 2


def test_a_nack_without_delay_backs_off_exponentially_with_jitter_up_to_retry_max() -> None:
    disp, _ = make(retry_base=1.0, retry_max=4.0)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(1, b"m")
    now = 0.0
    waits = []
    for _ in range(5):
        ((_, _, did, _),) = c.of(DELIVER)
        c.nack(did, error="boom")
        start = now
        while not c.conn.inflight:
            now += 0.01
            disp.tick(now)
        waits.append(now - start)
    # n-th failure: half of min(base * 2^(n-1), max), plus up to as much (0.01 steps of the clock)
    for n, wait in enumerate(waits, 1):
        full = min(2.0 ** (n - 1), 4.0)
        assert full / 2 - 0.011 <= wait <= full + 0.011, (n, waits)
    assert disp.stats()["nacked"] == 5


def test_the_20th_failure_dead_letters_with_its_history_and_tells_the_producer() -> None:
    disp, dead = make(max_deliveries=20, retry_base=0.01, retry_max=0.01)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(7, b"poison")
    now = 0.0
    for i in range(20):
        ((_, _, did, _),) = c.of(DELIVER)
        c.nack(did, error=f"error {i}")
        now += 0.02
        disp.tick(now)
    assert c.frames() == []
    ((letter,),) = dead
    assert (letter["reason"], letter["attempts"], letter["nacks"], letter["crashes"]) == ("max_deliveries", 20, 20, 0)
    assert letter["payload"] == b"poison" and letter["msg_id"] == 7 and letter["producer"] == "c1"
    assert letter["errors"] == [f"error {i}" for i in range(12, 20)]  # the last 8
    assert letter["consumers"] == ["c2"] * 16
    assert errors(prod.frames()) == [(7, ErrorCode.DEAD_LETTERED)]
    s = disp.stats()
    assert (s["dead_lettered"], s["held"], s["queue"], s["inflight"]) == (1, 0, 0, 0)


def test_reject_dead_letters_at_once_and_the_producer_gets_the_reason() -> None:
    disp, dead = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(1, b"bad")
    ((_, _, did, _),) = c.of(DELIVER)
    c.reject(did, "cannot parse")
    ((letter,),) = dead
    assert (letter["reason"], letter["detail"]) == ("rejected", "cannot parse")
    (err,) = [f for f in prod.frames() if f[0] == ERROR]
    doc = msgpack.unpackb(err[3])
    assert doc["code"] == ErrorCode.REJECTED and "cannot parse" in doc["reason"]


def test_crashes_quarantine_after_max_crashes_but_a_stopping_broker_counts_none() -> None:
    disp, dead = make(max_crashes=3)
    prod = Peer(disp, 1, "producer")
    prod.send(1, b"crasher")
    for cid in (10, 11):
        c = Peer(disp, cid, "consumer")
        assert [f[3] for f in c.of(DELIVER)] == [b"crasher"]
        c.conn.detach()
    assert dead == [] and disp.stats()["crashed"] == 2
    c12 = Peer(disp, 12, "consumer")
    assert [f[3] for f in c12.of(DELIVER)] == [b"crasher"]
    c = Peer(disp, 13, "consumer", prefetch=2)
    prod.send(2, b"fine")
    ((_, _, did, _),) = c.of(DELIVER)
    c.answer(did)  # it has answered: a lease it lets run out counts against the message
    disp.paused = True  # a broker shutting down: what consumers hold goes back uncounted
    c12.conn.detach()
    disp.paused = False
    assert disp.stats()["crashed"] == 2
    disp.pump_now()
    assert [f[3] for f in c.of(DELIVER)] == [b"crasher"]
    disp.tick(10.0)  # the lease: a crash too (its consumer stays, suspended)
    ((letter,),) = dead
    assert (letter["reason"], letter["crashes"]) == ("max_crashes", 3)
    assert letter["consumers"] == ["c10", "c11", "c13"]
    assert letter["errors"] == ["its consumer went away", "its consumer went away", "its lease ran out"]
    assert errors(prod.frames()) == [(1, ErrorCode.DEAD_LETTERED)]


def test_a_suspect_goes_alone_to_an_idle_consumer_so_bystanders_of_a_crash_are_not_blamed() -> None:
    disp, dead = make(max_crashes=2)
    prod = Peer(disp, 1, "producer")
    a = Peer(disp, 10, "consumer", prefetch=4)
    for i in range(1, 6):
        prod.send(i, b"m%d" % i)
    delivered = a.of(DELIVER)
    assert [f[3] for f in delivered] == [b"m1", b"m2", b"m3", b"m4"]
    a.answer(delivered[0][2])
    a.conn.detach()  # m2, m3, m4 were held: suspects now (one crash each); m5 waits behind them
    b = Peer(disp, 11, "consumer", prefetch=4)
    order = []
    while len(order) < 4:
        frames = b.of(DELIVER)
        assert len(frames) == 1 or order[-1:] == [b"m4"], [f[3] for f in frames]  # suspects one at a time
        for f in frames:
            order.append(f[3])
            b.answer(f[2], b"done " + f[3])
    assert order == [b"m2", b"m3", b"m4", b"m5"]
    assert dead == [] and len(prod.of(REPLY)) == 5  # m1 to m5, once each
    # the poison kills its consumer while it holds it alone: the second crash is its own
    prod.send(9, b"poison")
    c = Peer(disp, 12, "consumer", prefetch=4)
    (f,) = b.of(DELIVER) + c.of(DELIVER)
    (b if b.conn.inflight else c).conn.detach()
    d = Peer(disp, 13, "consumer", prefetch=4)
    live = [p for p in (b, c, d) if not p.conn.detached]
    (holder,) = [p for p in live if [f[3] for f in p.of(DELIVER)] == [b"poison"]]
    prod.send(10, b"bystander")
    prod.send(11, b"bystander 2")
    assert holder.frames() == []  # it holds the suspect alone: nothing else comes to it
    others = [f for p in live if p is not holder for f in p.of(DELIVER)]
    assert sorted(f[3] for f in others) == [b"bystander", b"bystander 2"]
    holder.conn.detach()
    ((letter,),) = dead
    assert (letter["payload"], letter["reason"], letter["crashes"]) == (b"poison", "max_crashes", 2)


def test_a_lease_run_out_at_a_consumer_that_never_answered_is_not_a_crash() -> None:
    disp, dead = make(lease=1.0, max_crashes=1)
    prod = Peer(disp, 1, "producer")
    prod.send(1, b"m")
    for i, cid in enumerate(range(10, 15)):  # five hung consumers, one after the other
        c = Peer(disp, cid, "consumer")
        assert [f[3] for f in c.of(DELIVER)] == [b"m"]
        disp.tick(1.0 + i)
    assert dead == [] and disp.stats()["crashed"] == 0 and disp.stats()["expired"] == 5
    good = Peer(disp, 2, "consumer")
    ((_, flags, did, _),) = good.of(DELIVER)
    assert flags >> 8 == 6
    good.answer(did, b"done")
    assert [f[3] for f in prod.of(REPLY)] == [b"done"]


def test_a_failing_dead_letter_store_keeps_the_messages_and_tries_again() -> None:
    disp, dead = make()
    calls = []

    def store(docs: list[dict]) -> None:
        calls.append(len(docs))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        dead.append(docs)

    disp.on_dead = store
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(1, b"bad")
    ((_, _, did, _),) = c.of(DELIVER)
    c.reject(did, "no")
    assert calls == [1] and dead == [] and disp.stats()["held"] == 1  # still the broker's
    disp.tick(0.5)
    assert calls == [1]
    disp.tick(1.0)
    assert calls == [1, 1] and len(dead) == 1 and disp.stats()["held"] == 0
    assert errors(prod.frames()) == [(1, ErrorCode.REJECTED)]


def test_a_message_that_crashed_a_consumer_goes_to_one_that_answers_not_to_the_next_hung_one() -> None:
    disp, dead = make(lease=2.0)
    prod = Peer(disp, 1, "producer")
    hung = [Peer(disp, 10 + i, "consumer", prefetch=4) for i in range(3)]
    good = Peer(disp, 2, "consumer", prefetch=4)
    mid = 0
    while not good.conn.inflight:  # every hung one took a run before the good one's turn
        mid += 1
        prod.send(mid, b"m%d" % mid)
    for f in good.of(DELIVER):
        good.answer(f[2])
    held_by_hung = sum(h.conn.inflight for h in hung)
    assert held_by_hung == mid - 1
    for h in hung:
        h.frames()
    disp.tick(2.0)  # the hung ones' leases run out: all their messages go to the one that answers
    redelivered = good.of(DELIVER)
    assert len(redelivered) == min(held_by_hung, 4) and all(f[1] & Flag.REDELIVERED for f in redelivered)
    assert all(h.frames() == [] for h in hung)
    while redelivered:
        for f in redelivered:
            good.answer(f[2])
        redelivered = good.of(DELIVER)
    assert dead == [] and disp.stats()["held"] == 0
    assert len(prod.of(REPLY)) == mid


@pytest.mark.parametrize("size", [10, 64, 100, 5000])
def test_a_deadline_is_stripped_and_the_forwarded_crc_still_verifies(size: int) -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    prod.send(1, payload, deadline_ms=5000)
    ((_, _, did, got),) = c.of(DELIVER)  # the fake transport's decoder verified its CRC
    assert got == payload
    c.answer(did, payload)
    assert [f[3] for f in prod.of(REPLY)] == [payload]


def test_an_expired_request_is_never_delivered_and_its_producer_is_told() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    prod.send(1, b"short", deadline_ms=1000)
    prod.send(2, b"long", deadline_ms=60000)
    prod.send(3, b"short behind", deadline_ms=1000)
    disp.tick(0.99)
    assert prod.frames() == [] and disp.stats()["queue"] == 3
    disp.tick(1.02)  # the head's deadline passed: removed at the tick
    assert errors(prod.frames()) == [(1, ErrorCode.EXPIRED)]
    c = Peer(disp, 2, "consumer")  # the one behind a live one goes when its turn comes
    assert [f[3] for f in c.of(DELIVER)] == [b"long"]
    assert errors(prod.frames()) == [(3, ErrorCode.EXPIRED)]
    assert disp.stats()["deadline_expired"] == 2 and disp.stats()["queue"] == 0
    prod.send(4, b"", flags=Flag.DEADLINE)  # no room for the deadline: refused
    assert errors(prod.frames()) == [(4, ErrorCode.NOT_ALLOWED)]


def test_fail_fast_is_refused_while_nobody_consumes() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    prod.send(1, b"x", flags=Flag.FAIL_FAST)
    assert errors(prod.frames()) == [(1, ErrorCode.NO_CONSUMER)] and disp.stats()["in"] == 0
    c = Peer(disp, 2, "consumer")
    prod.send(2, b"y", flags=Flag.FAIL_FAST, deadline_ms=1000)
    assert [f[3] for f in c.of(DELIVER)] == [b"y"]


def test_a_cancel_withdraws_a_queued_request_and_tells_the_consumer_of_one_in_flight() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    other = Peer(disp, 3, "producer")
    c = Peer(disp, 2, "consumer", prefetch=1)
    prod.send(1, b"in flight")
    prod.send(2, b"queued")
    other.send(2, b"same id, other session")
    ((_, _, did, _),) = c.of(DELIVER)
    prod.feed(encode_frame(T.CANCEL, 0, 2, b""))
    assert disp.stats()["queue"] == 1 and disp.stats()["cancelled"] == 1
    prod.feed(encode_frame(T.CANCEL, 0, 1, b""))
    assert [(f[0], f[2]) for f in c.frames()] == [(CANCEL, did)]
    c.answer(did, b"nobody waits")
    assert prod.frames() == []
    ((_, _, _, payload),) = c.of(DELIVER)
    assert payload == b"same id, other session"


# -- found in review: each failed before its fix ----------------------------------------------


def test_a_late_answer_does_not_end_the_isolation_of_a_suspect() -> None:
    disp, dead = make(lease=10.0, max_crashes=2)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer", prefetch=2)
    prod.send(1, b"warmup")
    (w,) = c.of(DELIVER)
    c.answer(w[2])  # proven
    prod.send(2, b"poison")
    prod.send(3, b"y")
    dids = {f[3]: f[2] for f in c.of(DELIVER)}
    disp.tick(8.0)
    c.touch(dids[b"y"])
    disp.tick(10.0)  # poison's lease runs out at a proven consumer: a crash, a suspect now
    c.answer(dids[b"y"])  # idle: the suspect goes to it, alone
    ((_, _, s_did, payload),) = c.of(DELIVER)
    assert payload == b"poison"
    prod.send(4, b"bystander")
    c.answer(dids[b"poison"], b"late")  # the first attempt's handler finishes: refused
    assert errors(c.frames()) == [(dids[b"poison"], ErrorCode.LEASE_EXPIRED)]
    assert c.conn.inflight == 1 and c.frames() == []  # still alone with the suspect
    c.conn.detach()  # the poison kills it
    ((letter,),) = dead
    assert (letter["payload"], letter["crashes"]) == (b"poison", 2)
    assert disp.stats()["crashed"] == 2  # the bystander was never with it


def test_a_suspect_is_delivered_under_steady_load() -> None:
    disp, _ = make(lease=0.0, max_crashes=3)
    prod = Peer(disp, 1, "producer")
    x = Peer(disp, 9, "consumer", prefetch=1)
    prod.send(1, b"w")
    (f,) = x.of(DELIVER)
    x.answer(f[2])
    prod.send(2, b"suspect")
    a = Peer(disp, 10, "consumer", prefetch=4)
    b = Peer(disp, 11, "consumer", prefetch=4)
    mid = 100
    for _ in range(10):
        prod.send(mid, b"m%d" % mid)
        mid += 1
    held = {p: p.of(DELIVER) for p in (a, b)}
    x.conn.detach()  # "suspect" crashed with x
    for _ in range(50):  # the queue never empties: a consumer is reserved and drains for it
        for p in (a, b):
            if held[p]:
                p.answer(held[p].pop(0)[2])
            prod.send(mid, b"m%d" % mid)
            mid += 1
            held[p] += p.of(DELIVER)
        if any(f[3] == b"suspect" for p in (a, b) for f in held[p]):
            break
    (holder,) = [p for p in (a, b) if any(f[3] == b"suspect" for f in held[p])]
    assert [f[3] for f in held[holder]] == [b"suspect"] and holder.conn.inflight == 1  # alone


def test_a_cancelled_request_in_flight_is_not_delivered_again() -> None:
    disp, dead = make(max_deliveries=3, retry_base=0.01, retry_max=0.01)
    prod = Peer(disp, 1, "producer")
    a = Peer(disp, 2, "consumer")
    prod.send(1, b"job")
    a.of(DELIVER)
    prod.feed(encode_frame(T.CANCEL, 0, 1, b""))
    assert [f[0] for f in a.frames()] == [CANCEL]
    a.conn.detach()  # its consumer goes away: the message is withdrawn, not requeued
    b = Peer(disp, 3, "consumer")
    assert b.of(DELIVER) == [] and dead == []
    assert disp.stats()["held"] == 0 and disp.stats()["queue"] == 0


def test_a_parked_request_keeps_its_deadline_from_receipt_and_a_parked_cancel_its_order() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.conn.hold_sends = True
    prod.send(1, b"one second at most", deadline_ms=1000)
    prod.send(2, b"a minute", deadline_ms=60000)
    prod.feed(encode_frame(T.CANCEL, 0, 2, b""))  # parked behind the SEND it cancels
    disp.tick(30.0)
    prod.conn.hold_sends = False
    prod.conn.release_sends()
    assert errors(prod.frames()) == [(1, ErrorCode.EXPIRED)]
    frames = c.frames()  # the minute one went out, then its consumer was told of the cancel
    assert [(f[0], f[3]) for f in frames] == [(DELIVER, b"a minute"), (CANCEL, b"")]
    c.answer(frames[0][2])
    assert prod.frames() == []


def test_a_message_fed_by_msg_carries_no_deadline() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    prod.send(1, bytes([130]) + b"fed", flags=Flag.API, deadline_ms=1000)
    assert [f[3] for f in prod.of(REPLY)] == [b"OK"]
    disp.tick(5.0)
    c = Peer(disp, 2, "consumer")
    assert [f[3] for f in c.of(DELIVER)] == [b"fed"] and disp.stats()["deadline_expired"] == 0


def test_expired_after_a_delivery_says_so() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(1, b"charge card", deadline_ms=2000)
    c.of(DELIVER)
    c.conn.detach()
    disp.tick(3.0)
    (err,) = [f for f in prod.frames() if f[0] == ERROR]
    doc = msgpack.unpackb(err[3])
    assert doc["code"] == ErrorCode.EXPIRED and "delivered 1 times" in doc["reason"]
    assert "never delivered" not in doc["reason"]


def test_a_closing_consumer_hands_back_what_it_cannot_handle_without_a_failure() -> None:
    disp, dead = make(max_deliveries=1, max_crashes=1)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.send(1, b"m")
    ((_, _, did, _),) = c.of(DELIVER)
    c.answer(did, msgpack.packb({"delay": 0, "error": None, "release": True}), Flag.RETRY)
    ((_, flags, did, payload),) = c.of(DELIVER)  # back at the head, no failure counted
    assert payload == b"m" and flags & Flag.REDELIVERED and dead == []
    assert disp.stats()["nacked"] == 0 and disp.stats()["crashed"] == 0


def test_a_routes_own_limits_and_lease_override_the_brokers() -> None:
    from teomq._core.command_parser import CommandTable
    from teomq._core.routes import KINDS

    disp = Dispatcher(queue_max=1000)
    table = CommandTable()
    table.add("strict")
    table.add("lax")
    table.add("subscribe")
    disp.set_schema(table, [KINDS["queue"], KINDS["queue"], KINDS["subscribe"]])
    disp.set_delivery(lease=30.0, max_deliveries=20, retry_base=0.01, retry_max=0.01)
    disp.set_route_delivery(0, lease=2.0, max_deliveries=2)
    dead: list[list[dict]] = []
    disp.on_dead = dead.append
    disp.tick(0.0)
    assert (disp.route_lease_of(0), disp.route_lease_of(1), disp.min_lease()) == (2.0, 30.0, 2.0)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    c.feed(encode_frame(T.SEND, 0, 1, b"subscribe/strict"))
    c.feed(encode_frame(T.SEND, 0, 2, b"subscribe/lax"))
    c.frames()
    prod.send(1, b"strict/x")
    prod.send(2, b"lax/y")
    now = 0.0
    for _ in range(2):
        for f in c.of(DELIVER):
            c.nack(f[2])
        now += 0.05
        disp.tick(now)
    assert [letter["payload"] for d in dead for letter in d] == [b"strict/x"]  # its own max_deliveries
    assert [f[3] for f in c.of(DELIVER)] == [b"lax/y"]  # the broker's 20: retried again
