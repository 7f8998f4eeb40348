"""Priorities, delays and time to live in the compiled Dispatcher, on a deterministic clock
(``Dispatcher.tick(now)``: no sleeping, no event loop): the heap of delayed messages, the
priority levels of a queue, and a model that predicts every delivery of a random run.

docs/semantics.md is what is held here; tests/test_schedule.py holds the same through the
real CLI, with a broker killed and restarted.
"""

from __future__ import annotations

import random

import pytest
from test_delivery_core import Peer, errors, make

from teomq._core.command_parser import CommandTable
from teomq._core.dispatch import Dispatcher
from teomq._core.frame_codec import encode_frame
from teomq._core.routes import KINDS
from teomq.protocol import ErrorCode, Flag, FrameType as T

DELIVER = int(T.DELIVER)


def send(peer: Peer, mid: int, payload: bytes, *, priority: int | None = None, delay_ms: int | None = None,
         deadline_ms: int | None = None, flags: int = Flag.NO_REPLY) -> None:
    """A SEND as teomq.Client builds it: [deadline u32][delay u32] before the payload."""
    prefix = b""
    if deadline_ms is not None:
        flags |= Flag.DEADLINE
        prefix += deadline_ms.to_bytes(4, "little")
    if delay_ms is not None:
        flags |= Flag.DELAY
        prefix += delay_ms.to_bytes(4, "little")
    if priority is not None:
        flags |= (priority + 1) << 8
    peer.feed(encode_frame(T.SEND, flags, mid, prefix + payload))


def delivered(c: Peer) -> list[tuple[int, bytes]]:
    return [(f[2], f[3]) for f in c.of(DELIVER)]


def test_a_higher_level_is_served_first_and_each_level_in_order() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    for i in range(64):
        send(prod, i + 1, f"{i}".encode(), priority=i % 4 if i % 5 else None)  # None: the default, 0
    c = Peer(disp, 2, "consumer", prefetch=1)
    got = []
    for _ in range(64):
        ((did, payload),) = delivered(c)
        got.append(int(payload))
        c.answer(did, b"", Flag.NO_ANSWER)
    level = {i: (i % 4 if i % 5 else 0) for i in range(64)}
    assert got == sorted(range(64), key=lambda i: (-level[i], i))
    assert disp.stats()["held"] == 0


def test_a_priority_past_the_highest_level_is_the_highest() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    send(prod, 1, b"seven", priority=7)
    prod.feed(encode_frame(T.SEND, Flag.NO_REPLY | (15 << 8), 2, b"fifteen"))  # wire value 15: past 7, so 7
    send(prod, 3, b"zero", priority=0)
    c = Peer(disp, 2, "consumer", prefetch=3)
    assert [p for _, p in delivered(c)] == [b"seven", b"fifteen", b"zero"]


def test_a_delayed_message_waits_for_its_time_and_no_longer_than_the_next_tick() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    send(prod, 1, b"later", delay_ms=5000)
    send(prod, 2, b"now")
    assert [p for _, p in delivered(c)] == [b"now"]
    assert disp.stats()["delayed"] == 1 and disp.stats()["held"] == 2  # in flight, and delayed: both count
    disp.tick(4.99)
    assert delivered(c) == []
    disp.tick(5.0)
    assert [p for _, p in delivered(c)] == [b"later"]
    assert disp.stats()["delayed"] == 0 and disp.stats()["delayed_in"] == 1


def test_the_heap_releases_random_delays_in_their_order_and_never_early() -> None:
    rng = random.Random(16)
    disp, _ = make(lease=0.0)  # (nothing is answered here)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer", prefetch=1000)
    due = {}
    for mid in range(1, 801):
        ms = rng.randrange(1, 60000)
        due[mid] = ms / 1000.0
        send(prod, mid, mid.to_bytes(4, "little"), delay_ms=ms)
    now = 0.0
    out: list[int] = []
    while now < 61.0:
        now += rng.uniform(0.01, 0.5)
        disp.tick(now)
        batch = [int.from_bytes(p, "little") for _, p in delivered(c)]
        assert all(due[m] <= now for m in batch), "released before its time"
        assert all(due[m] > now for m in due if m not in out and m not in batch), "due and still held"
        # those due in the same tick are released in due order
        assert [due[m] for m in batch] == sorted(due[m] for m in batch)
        out += batch
    assert sorted(out) == sorted(due)


def test_messages_delayed_alike_in_one_read_keep_their_order() -> None:
    disp, _ = make(lease=0.0)
    prod = Peer(disp, 1, "producer")
    frames = b""
    for mid in range(1, 301):      # one read: one clock reading, the same due time for all
        frames += encode_frame(T.SEND, Flag.NO_REPLY | Flag.DELAY | ((mid % 2 + 1) << 8), mid,
                               (2000).to_bytes(4, "little") + mid.to_bytes(4, "little"))
    prod.feed(frames)
    disp.tick(2.0)
    c = Peer(disp, 2, "consumer", prefetch=1000)
    got = [int.from_bytes(p, "little") for _, p in delivered(c)]
    assert got == [m for m in range(1, 301) if m % 2] + [m for m in range(1, 301) if not m % 2]


def test_cancelling_delayed_messages_takes_them_out_of_the_middle_of_the_heap() -> None:
    rng = random.Random(7)
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    ms = {mid: rng.randrange(1, 20000) for mid in range(1, 301)}
    for mid, d in ms.items():
        send(prod, mid, mid.to_bytes(4, "little"), delay_ms=d, flags=0)
    gone = set(rng.sample(sorted(ms), 100))
    for mid in sorted(gone, key=lambda m: -ms[m]):
        prod.feed(encode_frame(T.CANCEL, 0, mid, b""))
    assert disp.stats()["cancelled"] == 100 and disp.stats()["delayed"] == 200
    c = Peer(disp, 2, "consumer", prefetch=1000)
    disp.tick(25.0)
    got = [int.from_bytes(p, "little") for _, p in delivered(c)]
    assert got == sorted(set(ms) - gone, key=lambda m: ms[m])


def test_a_delayed_message_joins_the_tail_of_its_level_when_due() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    send(prod, 1, b"urgent later", priority=3, delay_ms=2000)
    for i in range(3):
        send(prod, 10 + i, f"bulk {i}".encode(), priority=0)
        send(prod, 20 + i, f"high {i}".encode(), priority=3)
    disp.tick(2.5)
    c = Peer(disp, 2, "consumer", prefetch=16)
    assert [p for _, p in delivered(c)] == [b"high 0", b"high 1", b"high 2", b"urgent later",
                                           b"bulk 0", b"bulk 1", b"bulk 2"]


def test_a_delayed_message_whose_deadline_passes_first_is_removed_and_its_producer_told() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    send(prod, 1, b"too late", delay_ms=5000, deadline_ms=3000, flags=0)
    send(prod, 2, b"in time", delay_ms=1000, deadline_ms=3000, flags=0)
    disp.tick(1.0)
    assert [p for _, p in delivered(c)] == [b"in time"]
    disp.tick(5.0)
    assert delivered(c) == [] and errors(prod.frames()) == [(1, ErrorCode.EXPIRED)]
    assert disp.stats()["deadline_expired"] == 1 and disp.stats()["held"] == 1  # "in time" is in flight


def test_a_short_delay_prefix_is_refused() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    prod.feed(encode_frame(T.SEND, Flag.DELAY, 1, b"ab"))
    assert errors(prod.frames()) == [(1, ErrorCode.NOT_ALLOWED)]
    assert disp.stats()["in"] == 0


def test_a_nack_with_a_delay_waits_in_the_same_heap() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    send(prod, 1, b"m", flags=0)
    ((did, _),) = delivered(c)
    c.nack(did, delay=2.0)
    assert disp.stats()["delayed"] == 1
    disp.tick(1.99)
    assert delivered(c) == []
    disp.tick(2.0)
    assert [p for _, p in delivered(c)] == [b"m"]


def test_a_parked_delayed_send_counts_its_delay_from_receipt() -> None:
    disp, _ = make()
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer")
    prod.conn.hold_sends = True
    send(prod, 1, b"in ten seconds", delay_ms=10000, deadline_ms=60000, flags=0)
    disp.tick(8.0)
    prod.conn.hold_sends = False
    prod.conn.release_sends()  # accepted at 8 s: due at 10 s, not at 18 s
    assert delivered(c) == []
    disp.tick(9.9)
    assert delivered(c) == []
    disp.tick(10.1)
    assert [p for _, p in delivered(c)] == [b"in ten seconds"]


def command_dispatcher(*routes: dict) -> Dispatcher:
    disp = Dispatcher(queue_max=100000)
    table = CommandTable()
    for r in routes:
        table.add(r["name"])
    table.add("subscribe")
    disp.set_schema(table, [KINDS["queue"]] * len(routes) + [KINDS["subscribe"]])
    for i, r in enumerate(routes):
        disp.set_route_delivery(i, priority=r.get("priority", 0), ttl=r.get("ttl", 0.0),
                                dead_letter_expired=r.get("dead_letter_expired", False))
    disp.set_delivery(lease=30.0)
    disp.tick(0.0)
    return disp


def test_a_commands_default_priority_and_ttl_apply_to_messages_that_name_none() -> None:
    disp = command_dispatcher({"name": "bulk"}, {"name": "alerts", "priority": 2, "ttl": 1.0})
    dead: list[list[dict]] = []
    disp.on_dead = dead.append
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer", prefetch=1)
    c.feed(encode_frame(T.SEND, 0, 1, b"subscribe/bulk"))
    c.feed(encode_frame(T.SEND, 0, 2, b"subscribe/alerts"))
    c.frames()
    send(prod, 1, b"bulk/first")                       # delivered at once: the consumer was idle
    send(prod, 2, b"bulk/second")
    send(prod, 3, b"alerts/stale")                     # its command's 1 s TTL
    send(prod, 4, b"alerts/kept", deadline_ms=60000)   # its own deadline wins over the command's
    send(prod, 5, b"bulk/urgent", priority=5)          # its own priority wins over the command's
    disp.tick(1.5)
    got = []
    for _ in range(4):
        ((did, payload),) = delivered(c)
        got.append(payload)
        c.answer(did, b"", Flag.NO_ANSWER)
    assert delivered(c) == []
    # priorities order each queue (a consumer of two queues takes their turns as before)
    assert [p for p in got if p.startswith(b"bulk/")] == [b"bulk/first", b"bulk/urgent", b"bulk/second"]
    assert [p for p in got if p.startswith(b"alerts/")] == [b"alerts/kept"]
    assert disp.stats()["deadline_expired"] == 1 and dead == []


def test_a_command_can_send_its_expired_messages_to_the_dead_letter_queue() -> None:
    disp = command_dispatcher({"name": "jobs", "ttl": 1.0, "dead_letter_expired": True})
    dead: list[list[dict]] = []
    disp.on_dead = dead.append
    prod = Peer(disp, 1, "producer")
    send(prod, 1, b"jobs/old", flags=0)
    disp.tick(1.5)
    assert [(d["payload"], d["reason"]) for batch in dead for d in batch] == [(b"jobs/old", "expired")]
    assert errors(prod.frames()) == [(1, ErrorCode.EXPIRED)]
    assert disp.stats()["deadline_expired"] == 1 and disp.stats()["held"] == 0


def test_a_queues_limits_count_its_delayed_messages() -> None:
    """max_messages, max_bytes and -queue-max-bytes bound what waits, delayed messages too: a
    queue full of delayed work refuses the next SEND, and takes one again once they are out."""
    disp = command_dispatcher({"name": "jobs"}, {"name": "other"})
    disp.set_limits(0, 3, 0)
    prod = Peer(disp, 1, "producer")
    for i in range(3):
        send(prod, i + 1, b"jobs/%d" % i, delay_ms=1000, flags=0)
    send(prod, 4, b"jobs/over", flags=0)             # not delayed: refused all the same
    send(prod, 5, b"jobs/over-delayed", delay_ms=1000, flags=0)
    assert errors(prod.frames()) == [(4, ErrorCode.QUEUE_FULL), (5, ErrorCode.QUEUE_FULL)]
    (jobs,) = [r for r in disp.route_stats() if r["name"] == b"jobs"]
    assert jobs["delayed"] == 3 and jobs["refused"] == 2
    disp.set_limits(0, 0, 3 * 6 + 7)                 # bytes (the payload is all of "jobs/0": 6)
    send(prod, 6, b"jobs/ok", flags=0)               # 7 more: at the limit
    send(prod, 7, b"jobs/no", flags=0)
    assert errors(prod.frames()) == [(7, ErrorCode.QUEUE_FULL)]
    disp.set_limits(0, 0, 0)
    disp.queue_max_bytes = 3 * 6 + 7                 # the broker's bound, over every queue
    send(prod, 8, b"other/1", flags=0)
    assert errors(prod.frames()) == [(8, ErrorCode.QUEUE_FULL)]
    disp.queue_max_bytes = 0
    c = Peer(disp, 2, "consumer", prefetch=8)
    c.feed(encode_frame(T.SEND, 0, 1, b"subscribe/jobs"))
    disp.tick(1.0)
    assert sorted(p for _, p in delivered(c)) == [b"jobs/0", b"jobs/1", b"jobs/2", b"jobs/ok"]
    (jobs,) = [r for r in disp.route_stats() if r["name"] == b"jobs"]
    assert jobs["delayed"] == 0 and disp.stats()["delayed"] == 0


class Model:
    """What one consumer with prefetch 1 must get: levels 0-7 each FIFO, the highest first; a
    delayed message joins its level's tail at the first tick at or past its time (those due at
    one tick in due order); one whose deadline (the broker's 10 ms steps) passed is removed."""

    def __init__(self) -> None:
        self.now = 0.0
        self.levels: list[list[tuple[int, int]]] = [[] for _ in range(8)]  # (mid, deadline cs)
        self.delayed: list[tuple[float, int, int, int]] = []  # (due, mid, level, deadline)
        self.holding: int | None = None
        self.expired = 0

    def cs(self) -> int:
        return int(self.now * 100.0) if self.now > 0 else 0

    def send(self, mid: int, level: int, delay_ms: int, deadline_ms: int) -> None:
        deadline = self.cs() + deadline_ms // 10 + 1 if deadline_ms else 0
        if delay_ms:
            self.delayed.append((self.now + delay_ms / 1000.0, mid, level, deadline))
        else:
            self.levels[level].append((mid, deadline))

    def tick(self, now: float) -> None:
        self.now = now
        due = sorted(d for d in self.delayed if d[0] <= now)
        self.delayed = [d for d in self.delayed if d[0] > now]
        for _, mid, level, deadline in due:
            if deadline and deadline <= self.cs():
                self.expired += 1
            else:
                self.levels[level].append((mid, deadline))

    def next(self) -> int | None:
        """The message delivered when the consumer has credit, if any."""
        for level in reversed(self.levels):
            while level:
                mid, deadline = level.pop(0)
                if deadline and deadline <= self.cs():
                    self.expired += 1
                    continue
                return mid
        return None


@pytest.mark.parametrize("seed", range(6))
def test_a_random_run_delivers_what_the_model_says(seed: int) -> None:
    rng = random.Random(seed)
    disp, _ = make(lease=0.0)
    prod = Peer(disp, 1, "producer")
    c = Peer(disp, 2, "consumer", prefetch=1)
    model = Model()
    holding: tuple[int, int] | None = None  # (delivery id, mid)
    now = 0.0
    dues: set[float] = set()
    sent = 0
    for mid in range(1, 1500):
        op = rng.random()
        if op < 0.6:
            level = rng.randrange(8)
            delay_ms = rng.choice([0, 0, 0, rng.randrange(1, 3000)])
            while delay_ms and now + delay_ms / 1000.0 in dues:
                delay_ms += 1  # distinct dues: those released at one tick come in due order
            dues.add(now + delay_ms / 1000.0)
            sent += 1
            deadline_ms = rng.choice([0, 0, rng.randrange(1, 2000)])
            send(prod, mid, mid.to_bytes(4, "little"), priority=level, delay_ms=delay_ms or None,
                 deadline_ms=deadline_ms or None)
            model.send(mid, level, delay_ms, deadline_ms)
        elif op < 0.8:
            now += rng.uniform(0.001, 0.3)
            disp.tick(now)
            model.tick(now)
        elif holding is not None:
            c.answer(holding[0], b"", Flag.NO_ANSWER)
            holding = None
        if holding is None:
            expect = model.next()
            got = delivered(c)
            if expect is None:
                assert got == [], f"step {mid}: delivered {got}, the model has nothing"
            else:
                assert [int.from_bytes(p, "little") for _, p in got] == [expect], f"step {mid}"
                holding = (got[0][0], expect)
        else:
            assert delivered(c) == []
    assert disp.stats()["delayed"] == len(model.delayed)
    # the rest: every message was delivered once or expired, none lost
    model.tick(now + 10.0)
    disp.tick(now + 10.0)
    if holding is not None:
        c.answer(holding[0], b"", Flag.NO_ANSWER)
    while (expect := model.next()) is not None:   # (held or not, what fell due comes now)
        ((did, payload),) = delivered(c)
        assert int.from_bytes(payload, "little") == expect
        c.answer(did, b"", Flag.NO_ANSWER)
    assert delivered(c) == [] and disp.stats()["held"] == 0
    assert disp.stats()["deadline_expired"] == model.expired
    assert disp.stats()["out"] + disp.stats()["deadline_expired"] == sent
