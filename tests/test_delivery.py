"""Delivery guarantees end to end (docs/semantics.md): a real broker through the CLI, real
consumer processes (tests/delivery_consumer.py: the library with a handler that crashes,
stalls, nacks or rejects on purpose) killed and stopped with real signals, teomq's clients
in the test's process, and ``teomq dlq`` as a user runs it.

Times here are real: leases of one or two seconds and generous bounds (hang guards on a
loaded 2-core machine). The deterministic-clock tests of the same rules are in
tests/test_delivery_core.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from procs import BrokerProc, CliProc, ProcGroup, parse_stat
from teomq import Cancelled, DeadLettered, Expired, Rejected
from teomq.client import Consumer, Producer
from teomq.protocol import FrameType

pytestmark = pytest.mark.integration

HANG = 60.0
CONSUMER = str(Path(__file__).with_name("delivery_consumer.py"))
GOT_RE = re.compile(r"^got (\S+) attempt (\d+) at ([0-9.]+)$")


def consumer(procs: ProcGroup, broker: BrokerProc, mode: str, *args: str, wait: bool = True) -> CliProc:
    proc = procs.start(broker.endpoint, mode, *args, label=f"consumer {mode}", python_args=[CONSUMER])
    if wait:
        proc.wait_for_line("^ready$")
    return proc


def got(proc: CliProc) -> list[tuple[str, int, float]]:
    return [(m.group(1), int(m.group(2)), float(m.group(3))) for m in map(GOT_RE.match, proc.lines) if m]


def dlq(procs: ProcGroup, broker: BrokerProc, *args: str) -> list[str]:
    proc = procs.start("dlq", *args, "-broker", broker.endpoint, label="dlq")
    assert proc.wait() == 0, proc.describe()
    return proc.lines


async def wait_for(pred, what: str, timeout: float = HANG) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


def last_stat(broker: BrokerProc) -> dict[str, int]:
    stats = [s for s in map(parse_stat, broker.proc.lines) if s]
    assert stats, broker.proc.describe()
    return stats[-1]


def test_a_poison_message_that_crashes_its_consumer_is_quarantined_and_the_rest_answered(
        procs: ProcGroup) -> None:
    """A consumer process that exits on one message, restarted in a loop (as a supervisor
    would): after -max-crashes (3) it is in the dead-letter queue with its history, every
    other request is answered, and ``teomq dlq replay`` puts it back in its queue."""
    broker = procs.broker("-nomsg", "-noweb")
    restarts = 0

    async def main() -> None:
        nonlocal restarts
        worker = consumer(procs, broker, "poison", wait=False)  # (it may die before it says ready)
        async with Producer(broker.endpoint, timeout=HANG) as p:
            names = [f"m{i}" for i in range(60)]
            names[20] = "poison"
            tasks = [asyncio.ensure_future(p.request(n.encode())) for n in names]
            while not all(t.done() for t in tasks):
                if not worker.alive:
                    restarts += 1
                    assert restarts <= 10, "restarted too often: the poison is not quarantined"
                    worker = consumer(procs, broker, "poison", wait=False)
                await asyncio.sleep(0.05)
            results = dict(zip(names, await asyncio.gather(*tasks, return_exceptions=True)))
        poisoned = results.pop("poison")
        assert isinstance(poisoned, DeadLettered) and "max_crashes" in str(poisoned), poisoned
        assert results == {n: b"ok " + n.encode() for n in results}  # every other one answered, once

    asyncio.run(main())
    assert restarts == 3  # each of the three crashes was the poison's
    listing = dlq(procs, broker, "list")
    assert len(listing) == 2 and listing[-1].startswith("1 dead letters"), listing
    letter_id = listing[0].split()[0]
    assert "max_crashes" in listing[0] and "crashes 3" in listing[0]
    shown = dlq(procs, broker, "show", letter_id)
    fields = dict(line.split(":", 1) for line in shown if ":" in line)
    assert fields["reason"].strip() == "max_crashes"
    assert fields["attempts"].strip().startswith("3 deliveries")
    assert fields["consumers"].strip().count("poison-") == 3  # the three processes that held it
    assert fields["error"].strip() == "its consumer went away"
    assert fields["payload"].strip() == "6 bytes: poison"
    # replay: back in its queue; a consumer that does not crash on it gets it
    for proc in procs.procs:
        if proc.label == "consumer poison" and proc.alive:
            proc.terminate()
    assert dlq(procs, broker, "replay", letter_id) == ["replayed 1"]
    assert dlq(procs, broker, "list")[-1].startswith("0 dead letters")
    taker = consumer(procs, broker, "answer")
    taker.wait_for_line(r"^got poison attempt 1 at ")


def test_a_stopped_consumer_loses_its_lease_and_its_late_answers_are_refused(procs: ProcGroup) -> None:
    """SIGSTOP a consumer while it holds messages: after the lease another consumer answers
    them; after SIGCONT its own answers come late and are refused; every request got exactly
    one answer."""
    broker = procs.broker("-nomsg", "-noweb", "-lease", "2", "-stat", "-stat-interval", "0.2")
    n = 40

    async def main() -> None:
        stopped = consumer(procs, broker, "slow", "1.5", "-prefetch", "16")
        async with Producer(broker.endpoint, timeout=HANG) as p:
            assert await p.request(b"warm") == b"ok warm"  # it has answered: what it lets lapse counts
            tasks = [asyncio.ensure_future(p.request(f"r{i}".encode())) for i in range(n)]
            await wait_for(lambda: len(got(stopped)) >= 17, "the slow consumer to hold its prefetch")
            os.kill(stopped.pid, signal.SIGSTOP)
            done = {line.split()[1] for line in stopped.lines if line.startswith("done ")}
            held = [name for name, _, _ in got(stopped) if name not in done]
            assert held
            other = consumer(procs, broker, "answer")
            answers = await asyncio.gather(*tasks)
            assert answers == [f"ok r{i}".encode() for i in range(n)]
            # the stopped one's went to it (its stdout lines may come a moment after its answers)
            await wait_for(lambda: {name for name, _, _ in got(other)} >= set(held), "the other's lines")
            os.kill(stopped.pid, signal.SIGCONT)
            await wait_for(lambda: sum("refused the answer to delivery" in line for line in stopped.err_lines)
                           >= len(held), "the late answers to be refused")
            assert all("lease ran out" in line for line in stopped.err_lines if "refused the answer" in line)
            assert p.stats["replies"] == n + 1
        await asyncio.sleep(0.5)  # a stat line after the last answer
        stat = last_stat(broker)
        assert stat["answered"] == n + 1 and stat["inflight"] == 0 and stat["queue"] == 0

    asyncio.run(main())


def test_a_slow_handler_keeps_its_lease_and_one_past_max_handler_time_loses_it(procs: ProcGroup) -> None:
    """An async handler that runs for three leases keeps its delivery (the client's TOUCH)
    and answers once; one past its max_handler_time is cancelled (a failure: the message goes
    to another consumer) and its consumer goes on taking work."""
    broker = procs.broker("-nomsg", "-noweb", "-lease", "1")

    async def main() -> None:
        slow = consumer(procs, broker, "slow", "3")
        async with Producer(broker.endpoint, timeout=HANG) as p:
            assert await p.request(b"long") == b"ok long"
            assert [(name, attempt) for name, attempt, _ in got(slow)] == [("long", 1)]  # never redelivered
            slow.terminate()
            limited = consumer(procs, broker, "slow", "30", "-max-handler-time", "1.5", "-prefetch", "1")
            task = asyncio.ensure_future(p.request(b"too-long"))
            await wait_for(lambda: got(limited), "the delivery to the limited consumer")
            await wait_for(lambda: "cancelled too-long" in limited.lines, "the handler to be cancelled")
            await wait_for(lambda: any("ran past max_handler_time" in line for line in limited.err_lines),
                           "the consumer's log line")
            # its one credit came back: it takes the next message (prefetch 1)
            assert await p.request(b"quick") == b"ok quick"
            rescuer = consumer(procs, broker, "answer")
            assert await task == b"ok too-long"
            await wait_for(lambda: got(rescuer), "the rescuer's line")  # (stdout comes a moment after)
            assert [name for name, _, _ in got(rescuer)] == ["too-long"]
            attempts = [attempt for name, attempt, _ in got(limited) + got(rescuer) if name == "too-long"]
            assert attempts == list(range(1, len(attempts) + 1))  # never two at once, never lost

    asyncio.run(main())


def test_retry_waits_its_delay_reject_and_the_20th_failure_dead_letter(procs: ProcGroup) -> None:
    broker = procs.broker("-nomsg", "-noweb", "-retry-base", "0.02", "-retry-max", "0.05")

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            retrier = consumer(procs, broker, "retry")
            assert await p.request(b"later") == b"ok later"
            (first, second) = got(retrier)
            assert (first[:2], second[:2]) == (("later", 1), ("later", 2))
            assert second[2] - first[2] >= 1.0  # Retry(delay=1): not before a second
            retrier.terminate()
            rejecter = consumer(procs, broker, "reject")
            t0 = time.monotonic()
            with pytest.raises(Rejected, match="cannot use bad"):
                await p.request(b"bad")
            assert time.monotonic() - t0 < 10 and len(got(rejecter)) == 1  # at once, no retry
            rejecter.terminate()
            failer = consumer(procs, broker, "fail")
            with pytest.raises(DeadLettered, match="max_deliveries"):
                await p.request(b"never")
            assert [attempt for _, attempt, _ in got(failer)] == list(range(1, 21))

    asyncio.run(main())
    listing = dlq(procs, broker, "list")
    assert [line.split()[2] for line in listing[:-1]] == ["rejected", "max_deliveries"], listing
    assert "attempts 20" in listing[1] and "nacks 20" in listing[1]
    shown = dlq(procs, broker, "show", listing[1].split()[0])
    assert "error:     handler raised RuntimeError: cannot do never" in shown
    assert dlq(procs, broker, "purge", "-all") == ["purged 2"]


def test_expired_requests_are_never_dispatched_and_a_cancelled_one_is_withdrawn(procs: ProcGroup) -> None:
    broker = procs.broker("-nomsg", "-noweb")

    async def main() -> None:
        async with Producer(broker.endpoint, timeout=HANG) as p:
            t0 = time.monotonic()
            expired = await asyncio.gather(*(p.request(f"e{i}".encode(), timeout=1) for i in range(20)),
                                           return_exceptions=True)
            assert all(isinstance(e, Expired) for e in expired), expired
            assert 1.0 <= time.monotonic() - t0 < 30
            assert sum(e.code == 15 for e in expired) >= 1  # the broker's word, at its tick after the deadline
            task = asyncio.ensure_future(p.request(b"withdrawn", timeout=30))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            outcomes: list[BaseException | None] = []
            mid = p.send(b"withdrawn-too", lambda _id, _answer, err: outcomes.append(err), timeout=30)
            await asyncio.sleep(0.3)
            assert p.cancel(mid) and not p.cancel(mid)
            assert len(outcomes) == 1 and isinstance(outcomes[0], Cancelled)
            await asyncio.sleep(0.5)
            late = consumer(procs, broker, "answer")  # started after every deadline and the cancels
            assert await p.request(b"fresh") == b"ok fresh"
            await wait_for(lambda: got(late), "the consumer's line")
            assert [name for name, _, _ in got(late)] == ["fresh"]
            assert len(outcomes) == 1

    asyncio.run(main())


def test_two_thousand_hung_consumers_do_not_swallow_a_working_consumers_requests(procs: ProcGroup) -> None:
    """2,000 consumers that take deliveries and never answer (raw connections: no TOUCH
    either), with -lease 2: a working consumer still answers every request of a producer
    within a few leases, and none is dead-lettered for the hung ones."""
    broker = procs.broker("-nomsg", "-noweb", "-lease", "2")
    n = 400

    async def hung_consumer() -> asyncio.StreamWriter:
        import msgpack

        from teomq._core.frame_codec import encode_frame
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        hello = {"v": 1, "role": "consumer", "name": "hung", "prefetch": 64, "nonce": os.urandom(16)}
        writer.write(encode_frame(FrameType.HELLO, 0, 0, msgpack.packb(hello)))
        await reader.read(24)  # the WELCOME begins: it is a consumer now; it never answers
        return writer

    async def main() -> None:
        def handler(data: bytes) -> bytes:
            return b"ok " + data

        async with Consumer(broker.endpoint, handler, name="worker"), \
                Producer(broker.endpoint, timeout=4 * 2 + 4) as p:
            assert await p.request(b"warm") == b"ok warm"
            hung = []
            for _ in range(20):
                hung += await asyncio.gather(*(hung_consumer() for _ in range(100)))
            window = asyncio.Semaphore(50)
            worst = 0.0

            async def one(i: int) -> bytes:
                nonlocal worst
                async with window:
                    t0 = time.monotonic()
                    answer = await p.request(f"r{i}".encode())
                    worst = max(worst, time.monotonic() - t0)
                    return answer

            answers = await asyncio.gather(*(one(i) for i in range(n)))
            assert answers == [f"ok r{i}".encode() for i in range(n)]
            print(f"2,000 hung consumers, -lease 2: {n} requests answered, the slowest in {worst:.2f} s")
            assert worst < 4 * 2 + 4  # a few leases, with room for a loaded machine
            for w in hung:
                w.close()

    asyncio.run(main(), debug=False)
    assert dlq(procs, broker, "list")[-1].startswith("0 dead letters")


def test_a_replayed_dead_letter_is_synced_into_its_queue_before_it_leaves_the_dead_letter_queue(
        tmp_path: Path) -> None:
    """``teomq dlq replay`` (Broker._dlq_replay) writes and syncs the message back into its queue
    before it removes it from the dead-letter queue, within the same call: a power cut at any
    moment leaves it in one of them. Checked on the log itself, before the loop runs again."""
    from teomq import Broker, Reject

    async def main() -> None:
        async with Broker(port=0, log_messages=False, record_address=False, data_dir=tmp_path / "data") as broker:
            def handler(data: bytes) -> bytes:
                raise Reject("no")

            async with Consumer(f"127.0.0.1:{broker.port}", handler), \
                    Producer(f"127.0.0.1:{broker.port}", timeout=HANG) as p:
                with pytest.raises(Rejected):
                    await p.request(b"again")
            dlq_ = broker.dlq
            assert dlq_ is not None and len(dlq_) == 1
            log_ = broker.storage.log  # type: ignore[union-attr]
            assert broker._dlq_replay(dlq_.ids()) == {"replayed": 1, "failed": {}}
            # nothing the log has written waits for a sync: the replayed record is durable
            assert log_.sync_targets()[1] == [] and log_.synced_batches == log_.stats()["batches"]
            assert len(dlq_) == 0

    asyncio.run(main())


def test_the_dead_letter_queue_is_bounded_and_a_commands_own_limit_applies(tmp_path: Path) -> None:
    """-dlq-max: past it the oldest dead letters go, counted; a schema command's max_deliveries
    overrides the broker's; with memory storage the dead-letter queue writes no file."""
    from teomq import Broker
    from teomq.commands import Command

    async def main() -> None:
        commands = [Command("jobs", routing="queue", max_deliveries=2)]
        async with Broker(port=0, log_messages=False, record_address=False, storage="memory", commands=commands,
                          dlq_max=2, retry_base=0.01, retry_max=0.01, data_dir=tmp_path / "data") as broker:
            worker = Consumer(f"127.0.0.1:{broker.port}")

            @worker.command("jobs")
            def jobs(cmd):  # type: ignore[no-untyped-def]
                raise RuntimeError(f"cannot do {cmd.data}")

            async with worker, Producer(f"127.0.0.1:{broker.port}", timeout=HANG) as p:
                for i in range(3):
                    with pytest.raises(DeadLettered, match="max_deliveries"):
                        await p.request(f"jobs/{i}")
            dlq_ = broker.dlq
            assert dlq_ is not None and len(dlq_) == 2 and dlq_.n_evicted == 1
            assert [(d.payload, d.attempts, d.route) for d in dlq_.list()] == [(b"jobs/1", 2, "jobs"),
                                                                              (b"jobs/2", 2, "jobs")]
            assert not (tmp_path / "data" / "dlq").exists()

    asyncio.run(main())
