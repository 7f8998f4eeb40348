"""The per-message log line, written by the core (msglog.pyx), through the real CLI.

- On by default, one line per accepted message on stderr, in the format of the broker's other
  log lines; ``-nomsg`` and ``-log-level WARNING`` turn it off; ``-log-file`` takes it and the
  rest of the log.
- A line is always one line: a text payload's first 256 bytes (backslash, tab, CR, LF escaped), a
  binary one (ill-formed UTF-8, other control characters) as its size and first 16 bytes in hex.
- A log that cannot be written (a full disk) loses lines, never messages: the broker serves on.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import teomq
from procs import ProcGroup
from teomq._core.msglog import SHOWN, MessageLog

pytestmark = pytest.mark.integration

LINE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO teomq\.broker\.messages: "
                     r"message #(\d+) from (.*?): (.*)$")


def shown(payload: bytes) -> str:
    """What a line shows of a payload: the model of msglog.put_text / put_binary."""
    head = payload[:SHOWN]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a character that the cut at SHOWN splits is left out; anything else ill-formed: binary
        cut_char = len(payload) > SHOWN and e.reason == "unexpected end of data"
        text = head[:e.start].decode("utf-8") if cut_char else None
    if text is None or any((c < " " and c not in "\t\n\r") or "\x7f" <= c <= "\x9f" for c in text):
        return f"(binary, {len(payload)} bytes) {payload[:16].hex()}{'...' if len(payload) > 16 else ''}"
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


PAYLOADS = [b"hello", "h\u00e9llo w\u00f6rld \u2603".encode(), b"bad \xff\xfe utf8 \xe2\x82", b"a\nb\rc\td",
            b"back\\slash", b"x" * 300, b"x" + "\u00e9".encode() * 200, b"", b"esc \x1b[31m", bytes(range(40))]


def message_lines(text: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1)), m.group(2), m.group(3)) for m in map(LINE_RE.match, text.split("\n")) if m]


async def send_all(endpoint: str, payloads: list[bytes], name: str = "p") -> None:
    async with teomq.Consumer(endpoint, lambda d: d, name="c") as _, \
            teomq.Producer(endpoint, name=name, timeout=60) as producer:
        for data in payloads:
            assert await producer.request(data) == data


def stop(broker) -> str:  # noqa: ANN001 - a BrokerProc
    broker.proc.terminate()
    return "\n".join(broker.proc.err_lines)


def test_one_line_per_message_on_stderr_by_default(procs: ProcGroup) -> None:
    broker = procs.broker("-noweb")
    asyncio.run(send_all(broker.endpoint, PAYLOADS, name="prod\\1"))
    lines = message_lines(stop(broker))
    assert lines == [(i + 1, "prod\\\\1", shown(p)) for i, p in enumerate(PAYLOADS)]
    assert lines[3][2] == "a\\nb\\rc\\td"
    assert lines[5][2] == "x" * 256  # the first 256 bytes
    assert lines[6][2] == "x" + "\u00e9" * 127  # the character the cut splits is left out
    assert lines[2][2] == "(binary, 14 bytes) 62616420fffe207574663820e282"
    assert lines[9][2] == "(binary, 40 bytes) 000102030405060708090a0b0c0d0e0f..."


def test_lines_are_written_while_the_broker_runs_with_nothing_to_deliver(procs: ProcGroup) -> None:
    # no consumer: the message only waits in the queue, no connection has output, yet the loop
    # pass's flush writes its line (not at shutdown)
    broker = procs.broker("-noweb")

    async def publish() -> None:
        async with teomq.Producer(broker.endpoint, name="lonely", timeout=60) as producer:
            producer.publish(b"waits in the queue")
            await producer.ping()

    asyncio.run(publish())
    broker.proc.wait_for_line(r"INFO teomq\.broker\.messages: message #\d+ from lonely: waits in the queue$",
                              stderr=True)
    assert broker.proc.popen.poll() is None  # still running: written by the loop, not at exit


@pytest.mark.parametrize("flags", [["-nomsg"], ["-log-level", "WARNING"]], ids=["nomsg", "warning"])
def test_nomsg_and_log_level_turn_it_off(procs: ProcGroup, flags: list[str]) -> None:
    broker = procs.broker("-noweb", *flags)
    asyncio.run(send_all(broker.endpoint, PAYLOADS[:3]))
    assert message_lines(stop(broker)) == []


def test_log_file_takes_every_line(procs: ProcGroup, tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    broker = procs.broker("-noweb", "-log-file", str(log))
    asyncio.run(send_all(broker.endpoint, PAYLOADS[:3]))
    err = stop(broker)
    assert broker.proc.wait() == 0
    text = log.read_text("utf-8")
    assert message_lines(text) == [(i + 1, "p", shown(p)) for i, p in enumerate(PAYLOADS[:3])]
    assert " INFO teomq.broker: producer p connected from " in text  # the Python log as well
    assert message_lines(err) == [] and "teomq.broker" not in err


def test_log_file_that_cannot_be_opened_is_a_clear_error(procs: ProcGroup, tmp_path: Path) -> None:
    proc = procs.start("broker", "-listen", ":0", "-noweb", "-data-dir", str(tmp_path / "b"),
                       "-log-file", str(tmp_path / "no" / "such" / "dir" / "broker.log"))
    assert proc.wait() == 2
    assert any("cannot open -log-file" in line and "No such file or directory" in line
               for line in proc.err_lines), proc.describe()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_loses_log_lines_not_messages(procs: ProcGroup) -> None:
    # every write of the log fails with ENOSPC: the broker serves on, every message answered
    # (send_all checks each answer), and no line of it shows up anywhere else
    broker = procs.broker("-noweb", "-log-file", "/dev/full")
    asyncio.run(send_all(broker.endpoint, [f"m{i}".encode() for i in range(200)]))
    assert broker.proc.popen.poll() is None
    assert message_lines(stop(broker)) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.text(max_size=200).map(str.encode), min_size=1, max_size=20),
       st.text(min_size=1, max_size=20).filter(lambda s: s.isprintable() and "\\" not in s and ":" not in s))
def test_lines_match_the_model(tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], name: str) -> None:
    path = tmp_path_factory.mktemp("msglog") / "log"
    log = MessageLog(str(path))
    for i, p in enumerate(payloads):
        log.write(name.encode(), i, p)
    assert log.lines == len(payloads) and log.pending > 0
    log.close()
    assert log.pending == 0 and log.dropped == 0
    text = path.read_bytes().decode("utf-8")  # always valid UTF-8
    assert text.count("\n") == len(payloads) and text.endswith("\n")  # one line each
    assert message_lines(text) == [(i, name, shown(p)) for i, p in enumerate(payloads)]


def test_a_descriptor_that_fails_drops_and_counts(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        log = MessageLog(fd)
        for i in range(3):
            log.write(b"p", i, b"x")
        log.flush()
        assert (log.dropped, log.pending, log.last_errno) == (3, 0, 9)  # EBADF: not open for writing
    finally:
        os.close(fd)


def test_a_buffer_past_its_limit_drops_new_lines(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)  # a reader that never reads: the pipe fills, then the buffer
    try:
        log = MessageLog(w, limit=1 << 16)
        for i in range(20_000):
            log.write(b"p", i, b"y" * 200)
            if i % 100 == 0:
                log.flush()
        assert log.dropped > 0 and log.pending <= 1 << 16
        assert log.lines + log.dropped == 20_000
    finally:
        os.close(r)
        os.close(w)
