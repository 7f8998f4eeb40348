"""The examples in teomq.examples, run as the README says: ``teomq example NAME ROLE [flags]`` (real processes)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import teomq.examples
from procs import ProcGroup, child_env
from teomq import example_cli
from teomq.examples import EXAMPLES

VALUE_RE = re.compile(r"^usrser-consumer(?:-api)? got command (num_players|num_servers): (\d+)$")
REPO = Path(__file__).resolve().parent.parent


def _example(name: str, role: str) -> list[str]:
    return ["-m", "teomq", "example", name, role]


def _run(procs: ProcGroup, name: str, role: str, *argv: str, label: str):
    return procs.start(*argv, label=label, python_args=_example(name, role))


def test_users_servers_example(procs: ProcGroup) -> None:
    """Broker, consumer, consumer -api and both producers: each consumer sees both kinds of values."""
    broker = procs.broker(python_args=_example("users_servers", "broker"))
    flags = [f"-broker={broker.address}"]
    consumer = _run(procs, "users_servers", "consumer", *flags, label="consumer")
    api = _run(procs, "users_servers", "consumer_api", *flags, "-api", label="consumer_api")
    consumer.wait_for_line(r"^usrser-consumer subscribed to version, num_players, num_servers")
    api.wait_for_line(r"^usrser-consumer-api hello answer: Hello usrser-consumer-api$")
    api.wait_for_line(r"^usrser-consumer-api subscribed to")
    producers = [
        _run(procs, "users_servers", "producer", *flags, f"-name=producer-{i}", f"-command={cmd}",
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
    for proc in producers:  # stopped with answers still being collected: dropped, not errors
        assert not [line for line in proc.lines if " error: " in line], proc.describe()


def test_command_example(procs: ProcGroup) -> None:
    """The version command: the producer prints each consumer's answer with its time."""
    broker = procs.broker(python_args=_example("command", "broker"))
    flags = [f"-broker={broker.address}"]
    for i in (1, 2):
        _run(procs, "command", "consumer", *flags, f"-name=consumer-{i}", label=f"consumer-{i}") \
            .wait_for_line(rf"^consumer-{i} subscribed to version")
    producer = _run(procs, "command", "producer", *flags, "-delay=200000", "-timeout=1", label="producer")
    answer = r"^\d\d:\d\d:\d\d\.\d{6} command-producer #1 answer in [\d.]+ ms: version: 0\.0\.1, data: some_data$"
    producer.wait_for_count(answer, 2)  # one answer from each consumer
    assert producer.terminate() == 0, producer.describe()
    assert not [line for line in producer.lines if " error: " in line], producer.describe()


def test_example_help_lists_every_example_and_role(tmp_path: Path) -> None:
    """``teomq example --help`` through the real CLI, from a directory that is not the repository."""
    res = subprocess.run([sys.executable, "-m", "teomq", "example", "--help"], capture_output=True, text=True,
                         env=child_env(tmp_path), cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    for name, (_, roles) in EXAMPLES.items():
        for role in roles:
            assert f"teomq example {name} {role} " in res.stdout, (name, role)
    top = subprocess.run([sys.executable, "-m", "teomq", "--help"], capture_output=True, text=True,
                         env=child_env(tmp_path), cwd=tmp_path, timeout=60)
    assert top.returncode == 0 and "example" in top.stdout, top.stderr


@pytest.mark.parametrize("name,role", [(n, r) for n, (_, roles) in EXAMPLES.items() for r in roles])
def test_every_role_runs_with_its_own_flags(name: str, role: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each listed role is a program whose --help shows the original's flags."""
    with pytest.raises(SystemExit) as info:
        example_cli.main([name, role, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    if role == "broker":
        assert out.startswith("usage: teomq broker") and "-schema" in out and "-command" in out
    else:
        assert out.startswith(f"usage: teomq example {name} {role}")
        expected = ["-broker", "-name", "-nomsg", "-stat"]
        if role == "producer":
            expected += ["-delay", "-timeout"] + (["-command"] if name == "users_servers" else [])
        if name == "users_servers" and role.startswith("consumer"):
            expected.append("-api")
        for flag in expected:
            assert f"{flag} " in out, flag


@pytest.mark.parametrize("argv,error", [
    ([], "give an example NAME and a ROLE"),
    (["nope", "broker"], "unknown example 'nope' (choose from command, users_servers)"),
    (["command"], "give a ROLE of command"),
    (["command", "consumer_api"], "unknown role 'consumer_api' of command (choose from broker, consumer, producer)"),
])
def test_bad_example_or_role_exits_2(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert example_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"teomq example: error: {error}")
    assert "usage: teomq example" in err


def test_a_missing_broker_flag_is_the_examples_own_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "teomq", "example", "command", "consumer"], capture_output=True,
                         text=True, env=child_env(tmp_path), timeout=60)
    assert res.returncode == 2
    assert "teomq example command consumer: error: the following arguments are required: -broker" in res.stderr


def test_the_examples_are_packaged() -> None:
    """Every examples package and the schema file are in pyproject's lists, so `pip install .` ships them."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    root = Path(teomq.examples.__file__).parent
    packages = {"teomq.examples", *(f"teomq.examples.{p.parent.name}" for p in root.glob("*/__init__.py"))}
    assert packages <= set(config["packages"])
    assert set(EXAMPLES) == {p.split(".")[-1] for p in packages - {"teomq.examples"}}
    for data in root.glob("*/*.json"):
        assert data.name in config["package-data"][f"teomq.examples.{data.parent.name}"], data
