"""The command-scheme examples under examples/, run as the README says (real processes)."""

from __future__ import annotations

import re

from procs import ProcGroup

VALUE_RE = re.compile(r"^usrser-consumer(?:-api)? got command (num_players|num_servers): (\d+)$")


def _run(procs: ProcGroup, module: str, *argv: str, label: str):
    return procs.start(*argv, label=label, python_args=["-m", module])


def test_users_servers_example(ex: ProcGroup) -> None:
    """Broker, consumer, consumer -api and both producers: each consumer sees both kinds of values."""
    broker = ex.broker(python_args=["-m", "examples.users_servers.broker"])
    flags = [f"-broker={broker.address}"]
    consumer = _run(ex, "examples.users_servers.consumer", *flags, label="consumer")
    api = _run(ex, "examples.users_servers.consumer_api", *flags, "-api", label="consumer_api")
    consumer.wait_for_line(r"^usrser-consumer subscribed to version, num_players, num_servers")
    api.wait_for_line(r"^usrser-consumer-api hello answer: Hello usrser-consumer-api$")
    api.wait_for_line(r"^usrser-consumer-api subscribed to")
    producers = [
        _run(ex, "examples.users_servers.producer", *flags, f"-name=producer-{i}", f"-command={cmd}",
             "-delay=100000", label=f"producer-{i}")
        for i, cmd in ((1, "num_servers"), (2, "num_players"))
    ]
    for proc in (consumer, api):
        for cmd in ("num_players", "num_servers"):
            proc.wait_until(lambda out, err, cmd=cmd: sum(
                1 for line in out if (m := VALUE_RE.match(line)) and m.group(1) == cmd) >= 3,
                f"three {cmd} values")
        values = [(m.group(1), int(m.group(2))) for line in proc.lines if (m := VALUE_RE.match(line))]
        assert {cmd for cmd, _ in values} == {"num_players", "num_servers"}
        assert all(1 <= v <= 100 for _, v in values), values
    # each producer's fanout collects the answers of both consumers
    for proc, cmd in zip(producers, ("num_servers", "num_players")):
        proc.wait_for_line(rf"^producer-\d got answer: usrser-consumer got {cmd}: \d+$")
        proc.wait_for_line(rf"^producer-\d got answer: usrser-consumer-api got {cmd}: \d+$")
    for proc in (*producers, consumer, api):
        assert proc.terminate() == 0, proc.describe()
        assert not any("Traceback" in line for line in proc.err_lines), proc.describe()


def test_command_example(ex: ProcGroup) -> None:
    """The version command: the producer prints each consumer's answer with its time."""
    broker = ex.broker(python_args=["-m", "examples.command.broker"])
    flags = [f"-broker={broker.address}"]
    for i in (1, 2):
        _run(ex, "examples.command.consumer", *flags, f"-name=consumer-{i}", label=f"consumer-{i}") \
            .wait_for_line(rf"^consumer-{i} subscribed to version")
    producer = _run(ex, "examples.command.producer", *flags, "-delay=200000", "-timeout=1", label="producer")
    answer = r"^\d\d:\d\d:\d\d\.\d{6} command-producer #1 answer in [\d.]+ ms: version: 0\.0\.1, data: some_data$"
    producer.wait_for_count(answer, 2)  # one answer from each consumer
    assert producer.terminate() == 0, producer.describe()
