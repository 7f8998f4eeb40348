"""Command routing in the dispatcher: one producer read of 1,000 command SENDs, no sockets.

The rig of test_micro_dispatch.py (BenchConnection, feed, counting sinks) with a command
schema. Per message (ns_per_msg), group dispatch-commands-1000x100B:

    basic              the basic scheme, 4 consumers (the baseline: no name lookup)
    queue-1            queue command ``work``, 1 subscribed consumer
    queue-1+10k        the same plus 10,000 subscriptions of 100 other consumers to 100 other
                       commands: routing ``work`` must not cost more (per-command index)
    queue-4            ``work`` with 4 subscribed consumers (round robin)
    fanout-4           fanout command ``news`` to 4 subscribers: 4 DELIVERs per message, one
                       shared payload block
The previous round's deliveries are answered in the untimed setup.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from test_micro_dispatch import ANSWER, DELIVER, SEND, BenchConnection, Sink, feed
from teomq._core.command_parser import CommandTable
from teomq._core.dispatch import Dispatcher
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq._core.routes import KINDS

N = 1000
PREFETCH = 2000
FANOUT, QUEUE = KINDS["fanout"], KINDS["queue"]
PAD = os.urandom(48).hex().encode()[:95]
SCENARIOS = {
    # name: (command, routing, working consumers, idle consumers, commands per idle consumer)
    "basic": (None, None, 4, 0, 0),
    "queue-1": (b"work", QUEUE, 1, 0, 0),
    "queue-1+10k": (b"work", QUEUE, 1, 100, 100),
    "queue-4": (b"work", QUEUE, 4, 0, 0),
    "fanout-4": (b"news", FANOUT, 4, 0, 0),
}


class RouteRig:
    def __init__(self, command: bytes | None, routing: int | None, working: int, idle: int, per_idle: int) -> None:
        self.disp = Dispatcher(max_payload=1 << 20, queue_max=10**7, scheduler=None)
        if command is not None:
            table, kinds = CommandTable(), []
            for name, kind in ((b"work", QUEUE), (b"news", FANOUT)):
                table.add(name)
                kinds.append(kind)
            for i in range(per_idle):
                table.add(b"idle%d" % i)
                kinds.append(QUEUE)
            self.disp.set_schema(table, kinds)
        payload = (command + b"/" if command else b"") + PAD
        self.sends = b"".join(encode_frame(SEND, 0, i + 1, payload) for i in range(N))
        self.producer = BenchConnection(self.disp)
        self.producer.transport = Sink()
        self.producer.accept_hello(False, 0)
        self.consumers = [self._consumer() for _ in range(working)]
        if command is not None:
            for c in self.consumers:
                assert self.disp.subscribe(c, command) == 0
        self.idle = [self._consumer() for _ in range(idle)]
        for c in self.idle:
            for i in range(per_idle):
                assert self.disp.subscribe(c, b"idle%d" % i) == 0

    def _consumer(self) -> BenchConnection:
        c = BenchConnection(self.disp)
        c.transport = Sink()
        c.accept_hello(True, PREFETCH)
        return c

    def answer_all(self) -> None:
        for c in self.consumers:
            frames = FrameDecoder(1 << 20).feed(c.transport.take())
            assert all(f[0] == DELIVER for f in frames)
            if frames:
                feed(c, b"".join(encode_frame(ANSWER, 0, f[2], f[3][:8]) for f in frames))
        self.producer.transport.take()


@pytest.mark.benchmark(group="dispatch-commands-1000x100B")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_route_send_to_deliver(benchmark: Any, report: Any, scenario: str) -> None:
    command, routing, working, idle, per_idle = SCENARIOS[scenario]
    rig = RouteRig(command, routing, working, idle, per_idle)
    benchmark.pedantic(feed, args=(rig.producer, rig.sends), setup=rig.answer_all,
                       rounds=200, warmup_rounds=20, iterations=1)
    rig.answer_all()
    stats = rig.disp.stats()
    copies = working if routing == FANOUT else 1
    assert stats["in"] > 0 and stats["in"] % N == 0
    assert stats["out"] == stats["answered"] == stats["in"] * copies and stats["inflight"] == 0
    assert stats["subscriptions"] == (working if command else 0) + idle * per_idle
    assert all(c.transport.nbytes == 0 for c in rig.idle)  # nothing reached the other commands
    report(items=N, item="msg", deliveries_per_msg=copies, subscriptions=stats["subscriptions"])
