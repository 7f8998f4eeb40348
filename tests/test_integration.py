"""End to end through the real CLI: broker, consumers and producers as separate processes.

Every process is ``python -m teomq ...`` (see tests/procs.py) talking over real TCP
sockets; outcomes are read from the documented stdout lines (teomq/cli.py) and exit
statuses. Each test runs the processes with ``-loop asyncio`` and with ``-loop uvloop``.
Waits are hang guards (tens of seconds); nothing here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from procs import DONE_RE, ProcGroup, parse_stat
from teomq.client import Client

pytestmark = pytest.mark.integration

MESSAGE = "Hello wold #{n}!"


def expected_messages(count: int) -> list[str]:
    return [MESSAGE.format(n=n) for n in range(1, count + 1)]


def answers_of(lines: list[str], name: str) -> list[str]:
    prefix = f"{name} got answer: "
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def messages_of(lines: list[str], name: str) -> list[str]:
    prefix = f"{name} got message: "
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def assert_each_once(got: list[str], expected: list[str], what: str) -> None:
    dupes = sorted(k for k, v in collections.Counter(got).items() if v > 1)
    assert not dupes, f"{what}: {len(dupes)} seen more than once, e.g. {dupes[:5]}"
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"{what}: missing {missing[:5]} ({len(missing)}), extra {extra[:5]}"
    assert len(got) == len(expected)


def finish_producer(producer: Any, name: str, count: int) -> list[str]:
    """Wait for a producer to exit 0 with every answer; its answers."""
    rc = producer.wait()
    lines = producer.lines
    done = [DONE_RE.match(line) for line in lines]
    done = [m for m in done if m]
    assert rc == 0, producer.describe()
    assert len(done) == 1 and done[0].group("name") == name, producer.describe()
    assert (done[0]["sent"], done[0]["answered"], done[0]["errors"]) == (str(count), str(count), "0")
    assert not [line for line in lines if " error for message #" in line]
    answers = answers_of(lines, name)
    assert_each_once(answers, [f"Answer to {m}" for m in expected_messages(count)], "answers")
    return answers


def wait_for_stat(broker_proc: Any, what: str, **want: int) -> dict[str, int]:
    """Wait for a broker ``stat:`` line whose counters include ``want``."""

    def pred(out: list[str], err: list[str]) -> dict[str, int] | None:
        for line in reversed(out):
            stat = parse_stat(line)
            if stat is not None and all(stat[k] == v for k, v in want.items()):
                return stat
        return None

    return broker_proc.wait_until(pred, what)  # type: ignore[return-value]


def wait_connected(broker_proc: Any, role: str, name: str) -> None:
    """Wait for the broker's log line saying the client finished its handshake."""
    broker_proc.wait_for_line(rf"INFO teomq\.broker: {role} {re.escape(name)} connected from", stderr=True)


# -- a. two consumers share the work ----------------------------------------------------------------


def test_two_consumers_answer_2000_requests_once_each(procs: ProcGroup, cli_loop: str) -> None:
    broker, address, port = procs.broker("-nomsg", loop=cli_loop)
    consumers = {}
    for name in ("c1", "c2"):
        consumers[name] = procs.start("consumer", f"-broker={address}", "-name", name, "-loop", cli_loop,
                                      label=name)
        wait_connected(broker, "consumer", name)
    producer = procs.start("producer", f"-broker={address}", "-count=2000", "-delay=0", "-window=64",
                           "-name", "p1", "-loop", cli_loop, label="p1")
    finish_producer(producer, "p1", 2000)

    seen = {}
    for name, proc in consumers.items():
        assert proc.alive, proc.describe()
        assert proc.terminate() == 0, proc.describe()  # SIGTERM: a clean stop
        seen[name] = messages_of(proc.lines, name)
    assert_each_once(seen["c1"] + seen["c2"], expected_messages(2000), "messages over both consumers")
    for name, got in seen.items():
        assert len(got) >= 200, f"{name} processed only {len(got)} of 2000 messages"
    assert broker.alive
    assert broker.terminate() == 0, broker.describe()


# -- b. messages wait in the queue for a consumer ------------------------------------------------------


def test_messages_sent_before_any_consumer_are_answered(procs: ProcGroup, cli_loop: str) -> None:
    broker = procs.broker("-nomsg", "-stat", "-stat-interval", "0.2", loop=cli_loop)
    producer = procs.start("producer", f"-broker={broker.endpoint}", "-count=20", "-delay=0", "-timeout=60",
                           "-name", "early", "-loop", cli_loop, label="early")
    wait_for_stat(broker.proc, "20 messages queued", queue=20, consumers=0, inflight=0)
    assert producer.alive and not answers_of(producer.lines, "early")

    consumer = procs.start("consumer", f"-broker={broker.endpoint}", "-name", "late", "-loop", cli_loop,
                           label="late")
    finish_producer(producer, "early", 20)
    wait_for_stat(broker.proc, "everything answered", answered=20, queue=0, inflight=0)
    assert consumer.terminate() == 0, consumer.describe()
    assert_each_once(messages_of(consumer.lines, "late"), expected_messages(20), "consumer messages")
    assert broker.proc.terminate() == 0, broker.proc.describe()


# -- c. a consumer killed with messages in flight ----------------------------------------------------------


@pytest.mark.parametrize("order", ["kill_then_start", "start_then_kill"])
def test_messages_of_a_killed_consumer_are_redelivered(procs: ProcGroup, cli_loop: str, order: str) -> None:
    broker = procs.broker("-nomsg", "-stat", "-stat-interval", "0.2", loop=cli_loop)
    spec = f"127.0.0.1:{broker.port}"
    stuck = procs.start("consumer", f"-broker={spec}", "-name", "A", "-prefetch=8", "-work-ms=100000",
                        "-loop", cli_loop, label="A")
    wait_connected(broker.proc, "consumer", "A")
    producer = procs.start("producer", f"-broker={spec}", "-count=50", "-delay=0", "-timeout=60",
                           "-name", "p", "-loop", cli_loop, label="p")
    # A holds its whole prefetch and answers none of it; the rest waits in the queue
    stuck.wait_for_count(r"^A got message: ", 8)
    wait_for_stat(broker.proc, "A holding 8 messages", inflight=8, queue=42, consumers=1)

    if order == "kill_then_start":
        assert stuck.kill9() == -signal.SIGKILL
        # its 8 go back to the queue at once, in front of the others
        wait_for_stat(broker.proc, "A's messages requeued", inflight=0, queue=50, consumers=0)
        helper = procs.start("consumer", f"-broker={spec}", "-name", "B", "-loop", cli_loop, label="B")
    else:
        helper = procs.start("consumer", f"-broker={spec}", "-name", "B", "-loop", cli_loop, label="B")
        helper.wait_for_count(r"^B got message: ", 42)  # B is live and has taken the queue
        assert stuck.kill9() == -signal.SIGKILL

    finish_producer(producer, "p", 50)
    held_by_a = messages_of(stuck.lines, "A")
    assert len(held_by_a) == 8 and len(set(held_by_a)) == 8
    wait_for_stat(broker.proc, "everything answered", answered=50, queue=0, inflight=0, consumers=1)
    assert helper.terminate() == 0, helper.describe()
    by_b = messages_of(helper.lines, "B")
    # B answered every message: A's 8 were redelivered to it, each once
    assert_each_once(by_b, expected_messages(50), "B's messages")
    assert set(held_by_a) <= set(by_b)
    assert broker.proc.terminate() == 0, broker.proc.describe()


# -- d. one connection both produces and consumes ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_broker(module_procs: ProcGroup) -> Any:
    """A CLI broker for tests that leave it as they found it (nothing queued or in flight)."""
    return module_procs.broker("-nomsg")


def test_client_in_both_roles_answers_its_own_requests(shared_broker: Any, module_procs: ProcGroup, arun: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEOMQ_HOME", str(module_procs.home))  # the bare address is in this address book

    async def main() -> None:
        for spec in (shared_broker.address, shared_broker.endpoint):
            client = Client(spec, role="both", name="selfie", handler=lambda data: b"self: " + data,
                            timeout=30)
            async with client:
                assert client.address == shared_broker.address  # verified by its key
                texts = [f"note {i}" for i in range(40)]
                answers = await asyncio.gather(*(client.request(t) for t in texts))
                assert answers == [f"self: {t}".encode() for t in texts]
                assert client.stats["received"] == 40 and client.stats["answered"] == 40
                assert client.stats["replies"] == 40 and client.stats["redelivered"] == 0

    arun(main())
    assert shared_broker.proc.alive, shared_broker.proc.describe()


# -- e. teomq-broker entry point and a persistent address ---------------------------------------------------


def test_broker_main_flags_and_address_survives_restart(procs: ProcGroup, tmp_path: Path) -> None:
    data_dir = tmp_path / "persistent"
    first = procs.broker("-nomsg", "-stat", "-stat-interval", "0.2", data_dir=data_dir,
                         python_args=["-c", "import sys; from teomq.cli import broker_main; sys.exit(broker_main())"])
    first.proc.wait_for_line(r"^stat: in=0 out=0 answered=0 queue=0 inflight=0 consumers=0 rate=")
    assert first.proc.terminate() == 0, first.proc.describe()

    # Go's explicit boolean form; stopped with SIGINT this time
    second = procs.broker("-nomsg=true", "-stat=false", data_dir=data_dir)
    assert second.address == first.address
    assert not [line for line in second.proc.lines if line.startswith("stat:")]
    second.proc.popen.send_signal(signal.SIGINT)
    assert second.proc.wait() == 0, second.proc.describe()

    other = procs.broker("-nomsg")  # another data dir: another key, another address
    assert other.address != first.address
    assert other.proc.terminate() == 0
