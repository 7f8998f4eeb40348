"""Argument parsing of ``teomq`` / ``teomq-broker``: Go-style and GNU-style flags, defaults, help, errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teomq import cli
from teomq.addressbook import default_data_dir
from teomq.stats_printer import format_stat

BROKER = "og71X6Y8TU1Y2W4G9GkUsKmxnvvd9r2vXp2"
REPO = Path(__file__).resolve().parent.parent

# (command, flag name without dashes, value given, expected attribute, expected parsed value)
VALUED = [
    ("broker", "listen", "0.0.0.0:7051", "listen", ("0.0.0.0", 7051)),
    ("broker", "data-dir", "/tmp/teomq-x", "data_dir", "/tmp/teomq-x"),
    ("broker", "max-payload", "4096", "max_payload", 4096),
    ("broker", "queue-max", "10", "queue_max", 10),
    ("broker", "stat-interval", "0.25", "stat_interval", 0.25),
    ("broker", "loop", "asyncio", "loop", "asyncio"),
    ("broker", "log-level", "debug", "log_level", "DEBUG"),
    ("consumer", "name", "c-1", "name", "c-1"),
    ("consumer", "prefetch", "8", "prefetch", 8),
    ("consumer", "work-ms", "12.5", "work_ms", 12.5),
    ("consumer", "stat-interval", "2", "stat_interval", 2.0),
    ("producer", "name", "p-1", "name", "p-1"),
    ("producer", "delay", "0", "delay", 0),
    ("producer", "count", "5", "count", 5),
    ("producer", "window", "3", "window", 3),
    ("producer", "timeout", "0.5", "timeout", 0.5),
    ("producer", "message", "msg {n}", "message", "msg {n}"),
    ("producer", "command", "num_players", "command", "num_players"),
    ("producer", "expect", "3", "expect", 3),
    ("consumer", "subscribe", "a,b", "subscribe", [["a", "b"]]),
    ("broker", "schema", "/tmp/schema.json", "schema", "/tmp/schema.json"),
    ("broker", "backlog-max", "16", "backlog_max", 16),
    ("broker", "storage", "memory", "storage", "memory"),
    ("broker", "fsync", "interval:50", "fsync", "interval:50"),
    ("broker", "segment-size", "65536", "segment_size", 65536),
    ("broker", "shutdown-timeout", "2.5", "shutdown_timeout", 2.5),
    ("broker", "memory-max", "8MiB", "memory_max", 8 << 20),
    ("broker", "memory-max", "2000000", "memory_max", 2_000_000),
    ("broker", "lease", "2.5", "lease", 2.5),
    ("broker", "lease", "0", "lease", 0.0),
    ("broker", "max-deliveries", "5", "max_deliveries", 5),
    ("broker", "max-crashes", "0", "max_crashes", 0),
    ("broker", "retry-base", "0.25", "retry_base", 0.25),
    ("broker", "retry-max", "30", "retry_max", 30.0),
    ("broker", "dlq-max", "100", "dlq_max", 100),
    ("broker", "queue-max-bytes", "1GiB", "queue_max_bytes", 1 << 30),
]
SWITCHES = [("broker", "nomsg"), ("broker", "stat"), ("broker", "noweb"), ("consumer", "nomsg"), ("consumer", "stat"),
            ("consumer", "reconnect"), ("consumer", "api"), ("consumer", "control"), ("producer", "nomsg"), ("producer", "stat"),
            ("producer", "reconnect")]
#: switches that are on unless turned off (-name=false)
ON_BY_DEFAULT = {("consumer", "reconnect"), ("producer", "reconnect")}
FLAGS = {
    "broker": ["listen", "data-dir", "nomsg", "stat", "stat-interval", "max-payload", "queue-max", "loop",
               "log-level", "log-file", "command", "schema", "dispatch-run", "backlog-max", "web", "web-origin", "noweb",
               "storage", "fsync", "segment-size", "shutdown-timeout", "memory-max",
               "queue-max-bytes", "lease", "max-deliveries", "max-crashes", "retry-base", "retry-max", "dlq-max"],
    "consumer": ["broker", "name", "nomsg", "stat", "stat-interval", "prefetch", "work-ms", "reconnect", "loop",
                 "log-level", "log-file", "subscribe", "api", "control"],
    "producer": ["broker", "name", "delay", "count", "window", "timeout", "nomsg", "stat", "stat-interval",
                 "message", "command", "expect", "loop", "log-level", "log-file", "reconnect"],
}


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def base(command: str) -> list[str]:
    return [command] if command == "broker" else [command, "-broker", BROKER]


def four_forms(name: str, value: str) -> list[list[str]]:
    return [[f"-{name}={value}"], [f"-{name}", value], [f"--{name}", value], [f"--{name}={value}"]]


@pytest.mark.parametrize("command,name,value,attr,expected", VALUED)
def test_valued_flag_parses_the_same_in_all_four_forms(command, name, value, attr, expected):
    for form in four_forms(name, value):
        args = parse(*base(command), *form)
        assert getattr(args, attr) == expected, form


def test_broker_flag_in_all_four_forms():
    for command in ("consumer", "producer"):
        for form in four_forms("broker", BROKER):
            assert parse(command, *form).broker == BROKER


@pytest.mark.parametrize("command,name", SWITCHES)
def test_switch_forms(command, name):
    attr = name.replace("-", "_")
    assert getattr(parse(*base(command)), attr) is ((command, name) in ON_BY_DEFAULT)
    for form in (f"-{name}", f"--{name}", f"-{name}=true", f"--{name}=1", f"-{name}=T"):
        assert getattr(parse(*base(command), form), attr) is True, form
    for form in (f"-{name}=false", f"--{name}=0", f"-{name}=F"):
        assert getattr(parse(*base(command), form), attr) is False, form


def test_switches_combine_with_other_flags():
    args = parse("producer", "-nomsg", "-stat", "-broker", BROKER, "-count=5", "-delay=0")
    assert (args.nomsg, args.stat, args.broker, args.count, args.delay) == (True, True, BROKER, 5, 0)


def test_broker_defaults():
    args = parse("broker")
    assert args.subcommand == "broker"
    assert args.listen == ("127.0.0.1", 7050)
    assert args.data_dir == str(default_data_dir())
    assert (args.nomsg, args.stat, args.stat_interval) == (False, False, 1.0)
    assert (args.max_payload, args.queue_max) == (1048576, 1_000_000)
    assert args.log_level == "INFO"
    assert (args.web, args.noweb) == (("127.0.0.1", 8094), False)
    assert parse("broker", "-web", ":0").web == ("127.0.0.1", 0)
    assert parse("broker", "-web=0.0.0.0:9000", "-noweb").web == ("0.0.0.0", 9000)
    try:
        import uvloop  # noqa: F401

        assert args.loop == "uvloop"
    except ImportError:
        assert args.loop == "asyncio"


def test_data_dir_default_follows_teomq_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TEOMQ_HOME", str(tmp_path))
    assert parse("broker").data_dir == str(tmp_path / "broker")


def test_consumer_defaults():
    args = parse("consumer", "-broker", BROKER)
    assert (args.name, args.prefetch, args.work_ms, args.reconnect) == (None, 64, 0.0, True)
    assert (args.nomsg, args.stat) == (False, False)


def test_producer_defaults():
    args = parse("producer", "-broker", BROKER)
    assert (args.name, args.delay, args.count, args.window, args.timeout) == (None, 1_000_000, 0, 64, 5.0)
    assert (args.message, args.command) == (None, None)
    assert cli.producer_message(args) == "Hello wold #{n}!"
    assert cli.producer_message(args).format(n=7, rand=1) == "Hello wold #7!"


def test_producer_message_with_command():
    assert cli.producer_message(parse("producer", "-broker", BROKER, "-command", "num_players")) == "num_players/{rand}"
    args = parse("producer", "-broker", BROKER, "-command", "num_players", "-message", "num_players/{n}")
    assert cli.producer_message(args) == "num_players/{n}"


def test_broker_command_specs():
    args = parse("broker", "-command", "num_players", "-command", "version/{data}/{description}:fanout",
                 "--command=jobs:queue")
    assert [(c.name, c.pattern, c.routing) for c in args.command] == [
        ("num_players", "", "fanout"), ("version", "{data}/{description}", "fanout"), ("jobs", "", "queue")]
    assert parse("broker").command == []


def test_broker_main_parser_matches_teomq_broker():
    argv = ["-listen=:0", "--data-dir", "/tmp/d", "-nomsg", "--stat", "-queue-max=5"]
    a = cli.build_broker_parser().parse_args(argv)
    b = parse("broker", *argv)
    assert vars(a) == {k: v for k, v in vars(b).items() if k != "subcommand"}
    assert a.func is b.func


@pytest.mark.parametrize(
    "text,expected",
    [
        (":0", ("127.0.0.1", 0)),
        ("127.0.0.1:7050", ("127.0.0.1", 7050)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:7050", ("::1", 7050)),
        ("[::]:0", ("::", 0)),
    ],
)
def test_parse_listen(text, expected):
    assert cli.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["7050", "host", "host:", "host:port", ":65536", ":-1", "::1:7050", "[::1]",
                                  "[::1]7050", "[]:1", "a b:1", ":٣"])
def test_parse_listen_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_listen(text)


BAD = [
    ["broker", "-listen=nonsense"],
    ["broker", "-listen", ":99999"],
    ["broker", "-max-payload=0"],
    ["broker", f"-max-payload={1 << 31}"],
    ["broker", "-queue-max=0"],
    ["broker", "-queue-max=ten"],
    ["broker", "-stat-interval=0"],
    ["broker", "-stat-interval=nan"],
    ["broker", "-loop=trio"],
    ["broker", "-log-level=loud"],
    ["broker", "-nomsg=maybe"],
    ["broker", "-broker", BROKER],  # not a broker flag
    ["broker", "-list=:0"],  # no abbreviations, in any form
    ["broker", "-list", ":0"],
    ["broker", "--list", ":0"],
    ["broker", "--list=:0"],
    ["broker", "-nom"],
    ["broker", "-sta"],
    ["consumer", "-brok", BROKER],
    ["consumer"],  # -broker is required
    ["consumer", "-broker", BROKER, "-prefetch=0"],
    ["consumer", "-broker", BROKER, "-work-ms=-1"],
    ["producer"],
    ["producer", "-broker", BROKER, "-delay=-1"],
    ["producer", "-broker", BROKER, "-count=-1"],
    ["producer", "-broker", BROKER, "-count=1.5"],
    ["producer", "-broker", BROKER, "-window=0"],
    ["producer", "-broker", BROKER, "-timeout=0"],
    ["producer", "-broker", BROKER, "-timeout=inf"],
    ["producer", "-broker", BROKER, "-message={x}"],
    ["producer", "-broker", BROKER, "-message={"],
    ["producer", "-broker", BROKER, "stray"],
    [],  # a command is required
    ["nonsense"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a) or "<empty>")
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_flag_that_prefixes_another_is_itself():
    args = parse("broker", "-stat", "-stat-interval=3")
    assert (args.stat, args.stat_interval) == (True, 3.0)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_lists_every_flag_in_both_forms(command, capsys):
    with pytest.raises(SystemExit) as info:
        parse(command, "--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS[command]:
        assert f"-{flag}" in out and f"--{flag}" in out, flag
    assert "default" in out


def test_registered_flags_are_exactly_the_documented_ones():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in FLAGS.items():
        strings = {s for a in sub.choices[command]._actions for s in a.option_strings}
        expected = {f"-{f}" for f in flags} | {f"--{f}" for f in flags} | {"-h", "--help"}
        assert strings == expected, command
        for action in sub.choices[command]._actions:
            assert action.help, action.option_strings


def test_format_stat():
    counters = {"in": 10, "out": 9, "answered": 8, "queue": 1, "inflight": 2, "consumers": 3, "extra": 99}
    line = format_stat(counters, cli.BROKER_STAT_FIELDS, 1234.4)
    assert line == "stat: in=10 out=9 answered=8 queue=1 inflight=2 consumers=3 rate=1234/s"
    assert format_stat({}, ("sent",), -1.0) == "stat: sent=0 rate=0/s"


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "teomq", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


def test_python_m_teomq_help():
    res = run_module("--help")
    assert res.returncode == 0, res.stderr
    for command in FLAGS:
        assert command in res.stdout


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_python_m_teomq_command_help(command):
    res = run_module(command, "--help")
    assert res.returncode == 0, res.stderr
    for flag in FLAGS[command]:
        assert f"-{flag}" in res.stdout and f"--{flag}" in res.stdout, flag


def test_python_m_teomq_bad_flag_exits_2():
    res = run_module("producer", "-broker", BROKER, "-window=0")
    assert res.returncode == 2
    assert "-window" in res.stderr and "error:" in res.stderr
