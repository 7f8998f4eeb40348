"""Flow control and the broker's one bound, against a real CLI broker.

- drain(): a publish() loop that calls ``await drain()`` every 1,000 messages sends as it
  goes (a consumer gets messages before the loop ends), ``ping()`` afterwards means the
  broker has every message, and the client's memory stays bounded.
- A ``role="both"`` client is held back by FLOW frames, not refused, while its answers flow.
- Queued plus in-flight messages never exceed ``-queue-max``, even with consumers that never
  answer; a client that ignores back-pressure is refused, and the broker logs it.
- A prefetch above the broker's limit is granted as the limit, and WELCOME says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import msgpack
import pytest

from procs import HANG_GUARD, ProcGroup, parse_stat
from rawwire import RawConn, hello
from teomq._core.frame_codec import encode_frame
from teomq.broker import MAX_PREFETCH
from teomq.protocol import ErrorCode, FrameType as T

pytestmark = pytest.mark.integration

CLIENTS = str(Path(__file__).with_name("flow_clients.py"))


def script_output(proc) -> dict[str, str]:  # noqa: ANN001 - a CliProc
    """The ``key=value`` pairs a flow_clients.py process printed."""
    out: dict[str, str] = {}
    for line in proc.lines:
        out.update(re.findall(r"(\w+)=(\S+)", line))
    return out


def test_drain_sends_as_the_loop_runs_and_ping_confirms_all(procs: ProcGroup) -> None:
    n, size = 200_000, 1024  # 200 MiB, were the client to keep it all
    broker = procs.broker("-nomsg")
    client = procs.start(CLIENTS, "publish", broker.endpoint, str(n), str(size), label="publisher",
                         python_args=[])
    client.wait_for_line(r"^done$", timeout=240)
    assert client.wait() == 0, client.describe()
    out = script_output(client)
    assert int(out["received_when_loop_ended"]) > 0  # bytes left while the loop ran
    assert out["refused"] == "0"
    assert int(out["received"]) == n
    growth = float(out["rss_after"]) - float(out["rss_before"])
    assert growth < 64, f"client RSS grew {growth:.0f} MiB for {n * size >> 20} MiB published"


@pytest.mark.parametrize("n, size", [(20_000, 100), (1_000, 65536)], ids=["small", "64KiB"])
def test_role_both_is_held_back_not_refused(procs: ProcGroup, n: int, size: int) -> None:
    # More than the bound, through a handler slower than the publisher; at 64 KiB, 64 MiB in
    # all: four times what the broker would park for a client that did not hold back.
    broker = procs.broker("-nomsg", "-queue-max", "2000" if size < 1000 else "200", "-log-level", "INFO")
    client = procs.start(CLIENTS, "both", broker.endpoint, str(n), str(size), label="both", python_args=[])
    client.wait_for_line(r"^done$", timeout=240)
    assert client.wait() == 0, client.describe()
    out = script_output(client)
    assert out["refused"] == "0" and out["callbacks"] == "0"
    assert int(out["held_back"]) > 0  # the broker's FLOW HOLD came, and the client heeded it
    assert int(out["received"]) == n
    broker.proc.wait_for_line(r"\(high mark\): holding back 1 producers", stderr=True)
    broker.proc.wait_for_line(r"\(low mark, .*\): resuming 1 producers", stderr=True)
    assert not broker.proc.count_lines(r"refused", stderr=True)


def _send_flood(port: int, role: str, count: int, payload: bytes, seconds: float) -> tuple[RawConn, int]:
    """Write up to ``count`` SENDs as fast as the socket takes them, for at most ``seconds``."""
    conn = RawConn(port)
    conn.send(hello(role=role, name=f"flood-{role}"))
    conn.welcome()
    conn.sock.setblocking(False)
    batch = b"".join(encode_frame(T.SEND, 0, i + 1, payload) for i in range(100))
    sent, view, end = 0, memoryview(b""), time.monotonic() + seconds
    while sent < count and time.monotonic() < end:
        if not view:
            view = memoryview(batch)
            sent += 100
        try:
            view = view[conn.sock.send(view):]
        except BlockingIOError:
            time.sleep(0.01)  # the broker stopped reading us: that is the point
    conn.sock.setblocking(True)
    return conn, sent


def test_in_flight_counts_against_queue_max(procs: ProcGroup) -> None:
    bound = 5000
    broker = procs.broker("-nomsg", "-queue-max", str(bound), "-stat", "-stat-interval", "0.1")
    # ten consumers that read every delivery and never answer, asking for far more credit
    hogs = []
    for i in range(10):
        hog = RawConn(broker.port)
        hog.send(hello(role="consumer", name=f"hog-{i}", prefetch=100_000))
        assert hog.welcome()["prefetch"] == MAX_PREFETCH  # granted as the limit, and said so
        hogs.append(hog)
    producer, sent = _send_flood(broker.port, "producer", 5 * bound, b"z" * 1024, seconds=10)
    assert sent > bound

    def totals() -> list[dict[str, int]]:
        return [s for s in map(parse_stat, broker.proc.lines) if s]

    # wait for the broker to settle: everything it took is in flight, nothing moves any more
    deadline = time.monotonic() + HANG_GUARD
    while True:
        stats = totals()
        if len(stats) > 20 and stats[-1]["in"] == stats[-10]["in"] and stats[-1]["in"] > 0:
            break
        assert time.monotonic() < deadline, broker.proc.describe()
        time.sleep(0.1)
    assert all(s["queue"] + s["inflight"] <= bound for s in stats), max(s["queue"] + s["inflight"] for s in stats)
    assert stats[-1]["in"] >= bound * 3 // 4  # it took messages up to its high mark at least
    rss_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{broker.proc.pid}/status").read_text()).group(1))
    assert rss_kib < 200 * 1024, f"broker peak RSS {rss_kib >> 10} MiB"
    for hog in hogs:
        hog.close()
    producer.close()


def test_client_that_ignores_backpressure_is_refused_and_logged(procs: ProcGroup) -> None:
    # A role "both" client without the flow capability (an older client) cannot be told to
    # hold back; its SENDs past the bound are parked (64 MiB per connection), then refused.
    broker = procs.broker("-nomsg", "-queue-max", "1000")
    conn, sent = _send_flood(broker.port, "both", 10_000, b"w" * 8192, seconds=30)  # 80 MiB
    assert sent == 10_000
    conn.sock.settimeout(HANG_GUARD)
    while True:
        ftype, _flags, fid, payload = conn.read_frame()
        assert ftype != T.FLOW  # it did not announce the flow capability
        if ftype == T.ERROR:
            err = msgpack.unpackb(payload)
            assert err["code"] == ErrorCode.QUEUE_FULL and err["reason"].startswith("held back"), err
            break
    broker.proc.wait_for_line(
        rf"WARNING teomq\.broker: both flood-both \({re.escape(conn.local)}\): \d+ messages? refused: "
        r"held back, and its parked messages reached their bound \(\d+ held of -queue-max 1000\)", stderr=True)
    conn.close()


def test_client_logs_a_prefetch_cut_to_the_limit(procs: ProcGroup, caplog: pytest.LogCaptureFixture) -> None:
    import teomq

    broker = procs.broker("-nomsg")

    async def main() -> None:
        async with teomq.Consumer(broker.endpoint, lambda d: d, prefetch=MAX_PREFETCH + 1):
            pass

    with caplog.at_level(logging.WARNING, logger="teomq.client"):
        asyncio.run(main())
    assert f"granted a prefetch of {MAX_PREFETCH} ({MAX_PREFETCH + 1} asked)" in caplog.text


def test_a_hung_consumer_does_not_stall_every_producer(procs: ProcGroup) -> None:
    # queue_max 100: high mark 75, low 18. A consumer holding 30 unanswered deliveries keeps
    # the broker above the low mark for good; producers still go on once the queue has drained.
    import teomq

    broker = procs.broker("-nomsg", "-queue-max", "100")
    hog = RawConn(broker.port)
    hog.send(hello(role="consumer", name="hung", prefetch=30))
    hog.welcome()

    async def main() -> dict[str, int]:
        async with teomq.Consumer(broker.endpoint, lambda d: d, name="healthy", prefetch=4) as healthy:
            async with teomq.Producer(broker.endpoint, name="p", timeout=HANG_GUARD) as producer:
                for i in range(2000):
                    producer.publish(b"job %d" % i)
                    if i % 50 == 49:
                        await producer.drain()
                await producer.ping()
                while healthy.stats["received"] < 2000 - 30:
                    await asyncio.sleep(0.01)
                return {"refused": producer.stats["refused"], "received": healthy.stats["received"]}

    got = asyncio.run(asyncio.wait_for(main(), HANG_GUARD))
    assert got == {"refused": 0, "received": 2000 - 30}
    hog.close()


def test_a_consumer_that_connects_at_the_high_mark_is_not_held_back(procs: ProcGroup) -> None:
    # queue_max 100: high mark 75. 80 messages sent, no consumer; then a consumer (flow capability)
    # connects, takes them all, and its own frames (a PING) go out: it was never held back, so
    # nothing of it waits for a release that back-pressure's end gives producers only.
    import teomq

    broker = procs.broker("-nomsg", "-queue-max", "100", "-stat", "-stat-interval", "0.1")

    async def main() -> dict[str, int]:
        async with teomq.Producer(broker.endpoint, name="p", timeout=HANG_GUARD) as producer:
            for i in range(80):
                producer.publish(b"job %d" % i)
            # the high mark: the broker holds the producer back (75 accepted, the rest wait in it)
            await asyncio.to_thread(broker.proc.wait_for_line, r"^stat: in=(7[5-9]|80) .* queue=(7[5-9]|80) ")
            async with teomq.Consumer(broker.endpoint, lambda d: d, name="late", prefetch=8) as late:
                while late.stats["received"] < 80:
                    await asyncio.sleep(0.01)
                await asyncio.wait_for(late.ping(), HANG_GUARD / 2)
                return {"received": late.stats["received"], "held_back": late.stats["held_back"]}

    assert asyncio.run(asyncio.wait_for(main(), HANG_GUARD)) == {"received": 80, "held_back": 0}
