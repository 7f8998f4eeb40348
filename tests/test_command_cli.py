"""The command scheme end to end through the real CLI: broker -command/-schema, consumer
-subscribe/-api, producer -command/-message, each a separate ``python -m teomq`` process.

Outcomes are read from the documented stdout lines and exit statuses (teomq/cli.py). Waits are
hang guards: a fanout producer stops collecting with ``-expect`` (the number of subscribers), so no
test depends on a collection window.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from procs import DONE_RE, CliProc, ProcGroup
from test_integration import answers_of, assert_each_once, messages_of, wait_for_stat

pytestmark = pytest.mark.integration

#: every producer's -timeout: a hang guard
LONG = "60"


def done_counts(proc: CliProc, name: str) -> tuple[int, int, int]:
    """Wait for a producer to exit; its ``done`` line's (sent, answered, errors)."""
    proc.wait()
    done = [m for m in map(DONE_RE.match, proc.lines) if m]
    assert len(done) == 1 and done[0]["name"] == name, proc.describe()
    return int(done[0]["sent"]), int(done[0]["answered"]), int(done[0]["errors"])


def finish_ok(proc: CliProc, name: str, sent: int, answered: int) -> list[str]:
    """The producer exits 0 having sent ``sent`` and got ``answered`` answers; its answers."""
    assert done_counts(proc, name) == (sent, answered, 0), proc.describe()
    assert proc.popen.returncode == 0, proc.describe()
    answers = answers_of(proc.lines, name)
    assert len(answers) == answered, proc.describe()
    return answers


def start_consumer(procs: ProcGroup, endpoint: str, name: str, *extra: str, loop: str | None = None) -> CliProc:
    """Start ``teomq consumer`` and wait until it has subscribed (its own log line)."""
    argv = ["consumer", f"-broker={endpoint}", "-name", name, *extra]
    if loop is not None:
        argv += ["-loop", loop]
    proc = procs.start(*argv, label=name)
    proc.wait_for_line(rf"INFO teomq\.cli: {re.escape(name)} subscribed to ", stderr=True)
    return proc


def producer(procs: ProcGroup, endpoint: str, name: str, *extra: str, loop: str | None = None) -> CliProc:
    argv = ["producer", f"-broker={endpoint}", "-name", name, "-delay=0", *extra]
    if loop is not None:
        argv += ["-loop", loop]
    return procs.start(*argv, label=name)


def stop(proc: CliProc) -> list[str]:
    """SIGTERM a consumer or broker, which must exit 0; its stdout lines."""
    assert proc.alive, proc.describe()
    assert proc.terminate() == 0, proc.describe()
    return proc.lines


# -- routing ------------------------------------------------------------------------------------------


def test_three_consumers_get_exactly_their_commands(procs: ProcGroup, cli_loop: str) -> None:
    """a and c fanout, b queue; c1 takes a,b, c2 takes b,c, c3 takes c."""
    broker = procs.broker("-nomsg", "-command", "a", "-command", "b:queue", "-command", "c:fanout", loop=cli_loop)
    ep = broker.endpoint
    c1 = start_consumer(procs, ep, "c1", "-subscribe", "a,b", loop=cli_loop)
    c2 = start_consumer(procs, ep, "c2", "-subscribe", "b", "-subscribe", "c", loop=cli_loop)
    c3 = start_consumer(procs, ep, "c3", "-subscribe=c", loop=cli_loop)
    pa = producer(procs, ep, "pa", "-message", "a/{n}", "-count=10", "-expect=1", f"-timeout={LONG}", loop=cli_loop)
    pb = producer(procs, ep, "pb", "-message", "b/{n}", "-count=40", f"-timeout={LONG}", loop=cli_loop)
    pc = producer(procs, ep, "pc", "-command", "c", "-count=10", "-expect=2", f"-timeout={LONG}", loop=cli_loop)

    a_msgs = [f"a/{n}" for n in range(1, 11)]
    b_msgs = [f"b/{n}" for n in range(1, 41)]
    assert_each_once(finish_ok(pa, "pa", 10, 10), [f"Answer to {m}" for m in a_msgs], "pa's answers")  # c1 only
    assert_each_once(finish_ok(pb, "pb", 40, 40), [f"Answer to {m}" for m in b_msgs], "pb's answers")
    c_answers = finish_ok(pc, "pc", 10, 20)  # c2 and c3 answer each

    got = {name: messages_of(stop(proc), name) for name, proc in (("c1", c1), ("c2", c2), ("c3", c3))}
    by_cmd = {name: collections.defaultdict(list) for name in got}
    for name, msgs in got.items():
        for m in msgs:
            by_cmd[name][m.split("/", 1)[0]].append(m)
    assert set(by_cmd["c1"]) == {"a", "b"} and set(by_cmd["c2"]) == {"b", "c"} and set(by_cmd["c3"]) == {"c"}
    # fanout a: c1 got every one, in order
    assert by_cmd["c1"]["a"] == a_msgs
    # queue b: split between c1 and c2, each message exactly once overall
    assert_each_once(by_cmd["c1"]["b"] + by_cmd["c2"]["b"], b_msgs, "b over c1 and c2")
    assert min(len(by_cmd["c1"]["b"]), len(by_cmd["c2"]["b"])) >= 10, {k: len(v["b"]) for k, v in by_cmd.items()}
    # fanout c (-command c sends c/<1..100>): c2 and c3 got the same ten, and pc both answers of each
    assert by_cmd["c2"]["c"] == by_cmd["c3"]["c"] and len(by_cmd["c2"]["c"]) == 10
    assert all(re.fullmatch(r"c/([1-9][0-9]?|100)", m) for m in by_cmd["c2"]["c"]), by_cmd["c2"]["c"]
    assert sorted(c_answers) == sorted(f"Answer to {m}" for m in by_cmd["c2"]["c"] * 2)
    stop(broker.proc)


def test_a_command_without_subscriber_waits_while_another_flows(procs: ProcGroup, cli_loop: str) -> None:
    broker = procs.broker("-nomsg", "-stat", "-stat-interval", "0.2", "-command", "a:queue",
                          "-command", "w:queue", loop=cli_loop)
    ep = broker.endpoint
    worker = start_consumer(procs, ep, "worker", "-subscribe", "a", loop=cli_loop)
    pw = producer(procs, ep, "pw", "-message", "w/{n}", "-count=5", f"-timeout={LONG}", loop=cli_loop)
    wait_for_stat(broker.proc, "five w waiting", queue=5, inflight=0, consumers=1)
    # -stat in the command scheme: a line per command with subscribers or waiting messages
    broker.proc.wait_for_line(r"^stat: command w routing=queue queued=5 subscribers=0 in=5 out=0$")
    broker.proc.wait_for_line(r"^stat: command a routing=queue queued=0 subscribers=1 in=0 out=0$")
    pa = producer(procs, ep, "pa", "-message", "a/{n}", "-count=20", f"-timeout={LONG}", loop=cli_loop)
    assert_each_once(finish_ok(pa, "pa", 20, 20), [f"Answer to a/{n}" for n in range(1, 21)], "pa's answers")
    wait_for_stat(broker.proc, "a answered, w still waiting", answered=20, queue=5, inflight=0)
    assert pw.alive and not answers_of(pw.lines, "pw"), pw.describe()

    late = start_consumer(procs, ep, "late", "-subscribe", "w", loop=cli_loop)
    assert finish_ok(pw, "pw", 5, 5) == [f"Answer to w/{n}" for n in range(1, 6)]
    broker.proc.wait_for_line(r"^stat: command w routing=queue queued=0 subscribers=1 in=5 out=5$")
    assert messages_of(stop(late), "late") == [f"w/{n}" for n in range(1, 6)]  # in order
    assert messages_of(stop(worker), "worker") == [f"a/{n}" for n in range(1, 21)]
    stop(broker.proc)


@pytest.mark.parametrize("routing", ["fanout", "queue"])
def test_after_unsubscribe_a_consumer_gets_no_more_of_that_command(procs: ProcGroup, routing: str) -> None:
    """consumer -control: 'unsubscribe a' on stdin; later a/ messages go to the other subscriber only."""
    broker = procs.broker("-nomsg", "-command", f"a:{routing}", "-command", "b:queue")
    ep = broker.endpoint
    c1 = procs.start("consumer", f"-broker={ep}", "-name", "c1", "-subscribe", "a,b", "-control",
                     label="c1", stdin=True)
    c1.wait_for_line(r"INFO teomq\.cli: c1 subscribed to a, b$", stderr=True)
    first = producer(procs, ep, "first", "-message", "a/{n}", "-count=5", "-expect=1", f"-timeout={LONG}")
    assert_each_once(finish_ok(first, "first", 5, 5), [f"Answer to a/{n}" for n in range(1, 6)], "first")
    assert messages_of(c1.lines, "c1") == [f"a/{n}" for n in range(1, 6)]

    c1.send_line("unsubscribe a")
    c1.wait_for_line(r"^c1 unsubscribed from a$")
    c1.send_line("unsubscribe nope")
    c1.wait_for_line(r"^c1 control error: command 'nope' not found \(code 10\)$")
    c2 = start_consumer(procs, ep, "c2", "-subscribe", "a")
    second = producer(procs, ep, "second", "-message", "a/{n}", "-count=5", "-expect=1", f"-timeout={LONG}")
    assert_each_once(finish_ok(second, "second", 5, 5), [f"Answer to a/{n}" for n in range(1, 6)], "second")
    # c1 still takes b, and got none of the second five a/ messages
    pb = producer(procs, ep, "pb", "-message", "b/{n}", "-count=2", f"-timeout={LONG}")
    assert_each_once(finish_ok(pb, "pb", 2, 2), ["Answer to b/1", "Answer to b/2"], "pb")
    assert messages_of(stop(c2), "c2") == [f"a/{n}" for n in range(1, 6)]
    assert messages_of(stop(c1), "c1") == [f"a/{n}" for n in range(1, 6)] + ["b/1", "b/2"]
    stop(broker.proc)


def test_hello_and_msg_through_the_cli(procs: ProcGroup) -> None:
    """hello/<data> answers 'Hello <data>'; msg/<data> answers OK and <data> reaches its subscriber."""
    broker = procs.broker("-nomsg", "-command", "b:queue")
    ep = broker.endpoint
    hello = producer(procs, ep, "hello", "-message", "hello/bob{n}", "-count=2", f"-timeout={LONG}")
    assert_each_once(finish_ok(hello, "hello", 2, 2), ["Hello bob1", "Hello bob2"], "hello")
    worker = start_consumer(procs, ep, "worker", "-subscribe", "b")
    fed = producer(procs, ep, "fed", "-message", "msg/b/{n}", "-count=3", f"-timeout={LONG}")
    assert finish_ok(fed, "fed", 3, 3) == ["OK"] * 3  # the broker's answer; the consumer's goes nowhere
    worker.wait_until(lambda out, err: len(messages_of(out, "worker")) == 3, "three fed messages")
    assert messages_of(stop(worker), "worker") == ["b/1", "b/2", "b/3"]
    stop(broker.proc)


# -- refusals -------------------------------------------------------------------------------------------


def test_unknown_commands_are_refused(procs: ProcGroup) -> None:
    broker = procs.broker("-nomsg", "-command", "a:queue")
    ep = broker.endpoint
    p = producer(procs, ep, "p", "-command", "nope", "-count=1", f"-timeout={LONG}")
    assert done_counts(p, "p") == (1, 0, 1)
    assert p.popen.returncode == 1, p.describe()
    assert "p error for message #1: command 'nope' not found (code 10)" in p.lines, p.describe()

    bad = procs.start("consumer", f"-broker={ep}", "-name", "cn", "-subscribe", "a,nope", label="cn")
    assert bad.wait() == 1, bad.describe()
    assert "teomq consumer cn: command 'nope' not found (code 10)" in bad.err_lines, bad.describe()
    reserved = procs.start("consumer", f"-broker={ep}", "-name", "ch", "-subscribe", "hello", label="ch")
    assert reserved.wait() == 1, reserved.describe()
    assert "teomq consumer ch: 'hello' is a broker command: nothing to subscribe (code 9)" in reserved.err_lines, \
        reserved.describe()
    broker.proc.wait_for_line(r"WARNING teomq\.broker: producer p \(.*\): message #1 refused: "
                              r"command 'nope' not found$", stderr=True)

    # the broker is unharmed: a consumer of a and a producer of a work
    worker = start_consumer(procs, ep, "worker", "-subscribe", "a")
    ok = producer(procs, ep, "ok", "-message", "a/{n}", "-count=3", f"-timeout={LONG}")
    assert_each_once(finish_ok(ok, "ok", 3, 3), [f"Answer to a/{n}" for n in (1, 2, 3)], "ok's answers")
    stop(worker)
    stop(broker.proc)


# -- -api and -schema ---------------------------------------------------------------------------------------


def test_api_consumer_with_a_schema_file(procs: ProcGroup, cli_loop: str, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"commands": [
        {"name": "version", "description": "the app's version", "pattern": "{data}/{description}",
         "routing": "queue"},
        {"name": "num_players", "description": "players online"},
    ]}), encoding="utf-8")
    broker = procs.broker("-nomsg", "-schema", str(schema), "-command", "extra:queue", loop=cli_loop)
    broker.proc.wait_for_line(r"command scheme, 3 commands: version \(queue, \{data\}/\{description\}\), "
                              r"num_players \(fanout\), extra \(queue\)$", stderr=True)
    ep = broker.endpoint
    capi = start_consumer(procs, ep, "capi", "-api", "-subscribe", "version,extra", loop=cli_loop)
    capi.wait_for_line(r"^capi hello answer: Hello capi$")
    for name in ("version", "extra"):
        broker.proc.wait_for_line(rf"consumer capi subscribed to {name}$", stderr=True)
    pv = producer(procs, ep, "pv", "-message", "version/{n}/desc", "-count=3", f"-timeout={LONG}", loop=cli_loop)
    pe = producer(procs, ep, "pe", "-message", "extra/{n}", "-count=3", f"-timeout={LONG}", loop=cli_loop)
    assert_each_once(finish_ok(pv, "pv", 3, 3), [f"Answer to version/{n}/desc" for n in (1, 2, 3)], "pv")
    assert_each_once(finish_ok(pe, "pe", 3, 3), [f"Answer to extra/{n}" for n in (1, 2, 3)], "pe")
    # num_players is in the schema but capi did not subscribe to it: it waits, capi never sees it
    pn = producer(procs, ep, "pn", "-command", "num_players", "-count=1", "-timeout=0.5", loop=cli_loop)
    assert finish_ok(pn, "pn", 1, 0) == []
    got = messages_of(stop(capi), "capi")
    assert sorted(got) == sorted([f"version/{n}/desc" for n in (1, 2, 3)] + [f"extra/{n}" for n in (1, 2, 3)])
    stop(broker.proc)


@pytest.mark.parametrize("content,extra,fragment", [
    ("{not json", [], "not JSON"),
    ('{"commands": [{"name": "msg"}]}', [], "command #1: 'msg' is a broker command"),
    ('{"commands": [{"name": "a", "routing": "topic"}]}', [], "command #1: routing of command 'a'"),
    ('{"commands": [{"name": "a"}]}', ["-command", "a:queue"], "command 'a' is already registered"),
    (None, [], "No such file"),
    (None, ["-command", "hello"], "'hello' is a broker command"),  # -command alone
], ids=["not-json", "reserved-name", "bad-routing", "duplicate", "missing-file", "reserved-command"])
def test_bad_schema_makes_the_broker_exit_1(procs: ProcGroup, tmp_path: Path, content: str | None,
                                              extra: list[str], fragment: str) -> None:
    argv = ["broker", "-listen", ":0", "-data-dir", str(tmp_path / "data"), *extra]
    if content is not None or not extra:
        path = tmp_path / "schema.json"
        if content is not None:
            path.write_text(content, encoding="utf-8")
        argv += ["-schema", str(path)]
    proc = procs.start(*argv, label="broker")
    assert proc.wait() == 1, proc.describe()
    errors = [line for line in proc.err_lines if line.startswith("teomq broker: bad command schema: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.describe()
    assert not any(line.startswith("teomq broker listening") for line in proc.lines), proc.describe()


@pytest.mark.parametrize("argv,fragment", [
    (["broker", "-command", "a:topic"], "routing of command 'a' must be one of fanout, queue"),
    (["broker", "-command", ":queue"], "bad command ':queue'"),
    (["broker", "-command", "a:b:c"], "bad command 'a:b:c'"),
    (["consumer", "-broker", ":1", "-subscribe", "a/b"], "bad command list"),
    (["consumer", "-broker", ":1", "-subscribe", ","], "bad command list"),
    (["producer", "-broker", ":1", "-command", "a/b"], "bad command name"),
], ids=["broker-routing", "broker-no-name", "broker-two-colons", "consumer-slash", "consumer-empty",
        "producer-slash"])
def test_bad_command_arguments_are_usage_errors(procs: ProcGroup, tmp_path: Path, argv: list[str],
                                                 fragment: str) -> None:
    if argv[0] == "broker":
        argv = [*argv, "-listen", ":0", "-data-dir", str(tmp_path / "data")]
    proc = procs.start(*argv, label=argv[0])
    assert proc.wait() == 2, proc.describe()
    err = "\n".join(proc.err_lines)
    assert "usage:" in err and fragment in err, proc.describe()
