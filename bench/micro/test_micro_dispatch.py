"""Dispatch loop: one producer read of 1,000 SEND frames through the broker's core, no sockets.

One Dispatcher (scheduler=None: it flushes synchronously at the end of buffer_updated), one
producer connection and 4 consumer connections with prefetch 1000, each writing into a sink
that only counts bytes. Reads are fed the way the event loop feeds a BufferedProtocol:
``get_buffer`` + copy + ``buffer_updated``, so the copy into the read buffer is timed too.

Group dispatch-1000x100B, each figure per message (ns_per_msg):
    send_to_deliver   a producer read of 1,000 SENDs -> queue -> 4 x 250 DELIVERs, flushed
                      (one write per consumer). The previous round's deliveries are answered
                      in the untimed setup.
    answer_to_reply   4 consumer reads of 250 ANSWERs each -> 1,000 REPLYs to the producer,
                      flushed. The SENDs they answer are dispatched in the untimed setup.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from teomq._core.connection import CoreConnection
from teomq._core.dispatch import Dispatcher
from teomq._core.frame_codec import FrameDecoder, encode_frame

SEND, DELIVER, ANSWER, REPLY = 3, 4, 5, 6
N = 1000
CONSUMERS = 4
PREFETCH = 1000
PAYLOAD = os.urandom(100)
SENDS = b"".join(encode_frame(SEND, 0, i + 1, PAYLOAD) for i in range(N))


class Sink:
    """A transport that counts what the dispatcher writes and keeps it for decoding."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.writes = 0
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.writes += 1
        self.chunks.append(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


class BenchConnection(CoreConnection):
    """A connection with the handshake done by hand (no HELLO frame) and a counting sink."""

    def on_control(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        raise AssertionError(f"unexpected control frame {ftype}")

    def on_protocol_error(self, exc: BaseException) -> None:
        raise AssertionError(f"protocol error in the benchmark: {exc!r}")


def feed(conn: CoreConnection, data: bytes) -> None:
    """What the event loop does on a read: copy into get_buffer(), then buffer_updated()."""
    n = len(data)
    mv = conn.get_buffer(n)
    mv[:n] = data
    conn.buffer_updated(n)


class Rig:
    def __init__(self) -> None:
        self.disp = Dispatcher(max_payload=1 << 20, queue_max=10**6, scheduler=None)
        self.producer = BenchConnection(self.disp)
        self.producer.transport = Sink()
        self.producer.accept_hello(False, 0)
        self.consumers = []
        for _ in range(CONSUMERS):
            c = BenchConnection(self.disp)
            c.transport = Sink()
            c.accept_hello(True, PREFETCH)
            self.consumers.append(c)

    def answers(self) -> list[bytes]:
        """Each consumer's ANSWER read (echoing the payload) for what it was delivered."""
        out = []
        for c in self.consumers:
            frames = FrameDecoder(1 << 20).feed(c.transport.take())
            assert all(f[0] == DELIVER for f in frames)
            out.append(b"".join(encode_frame(ANSWER, 0, f[2], f[3]) for f in frames))
        return out

    def answer_all(self) -> None:
        for c, data in zip(self.consumers, self.answers(), strict=True):
            if data:
                feed(c, data)
        self.producer.transport.take()


@pytest.mark.benchmark(group="dispatch-1000x100B")
def test_send_to_deliver(benchmark: Any, report: Any) -> None:
    rig = Rig()
    benchmark.pedantic(feed, args=(rig.producer, SENDS), setup=rig.answer_all,
                       rounds=300, warmup_rounds=20, iterations=1)
    rig.answer_all()
    stats = rig.disp.stats()
    assert stats["in"] == stats["out"] == stats["answered"] and stats["inflight"] == 0
    assert stats["in"] % N == 0 and stats["in"] > 0
    report(items=N, item="msg", consumers=CONSUMERS)


@pytest.mark.benchmark(group="dispatch-1000x100B")
def test_answer_to_reply(benchmark: Any, report: Any) -> None:
    rig = Rig()
    reads: list[bytes] = []

    def setup() -> None:
        feed(rig.producer, SENDS)
        reads[:] = rig.answers()
        rig.producer.transport.take()

    def run() -> None:
        for c, data in zip(rig.consumers, reads, strict=True):
            feed(c, data)

    benchmark.pedantic(run, setup=setup, rounds=300, warmup_rounds=20, iterations=1)
    stats = rig.disp.stats()
    assert stats["in"] == stats["out"] == stats["answered"] and stats["inflight"] == 0
    assert len(rig.producer.transport.take()) == N * (24 + len(PAYLOAD))
    report(items=N, item="msg", consumers=CONSUMERS)
