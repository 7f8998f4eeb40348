"""Bad input on raw TCP sockets against a real CLI broker, with good traffic running beside it.

A module-wide CLI broker (once with ``-loop asyncio``, once with ``-loop uvloop``) serves a
well-behaved CLI consumer and a CLI producer sending 300 requests slowly, while each test
opens a raw socket and misbehaves. Each fatal case must end in an ERROR frame with the
code docs/protocol.md gives, a non-empty reason, the broker closing the connection (EOF)
and a WARNING line in the broker's log. The last test checks that the good producer got
every answer exactly once and that the broker is still running.
"""

from __future__ import annotations

import asyncio
import collections
import re
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from procs import DONE_RE, LOOP_KINDS, ProcGroup, parse_stat
from rawwire import RawConn, hello, raw_frame
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.broker import Broker
from teomq.protocol import DEFAULT_MAX_PAYLOAD, ErrorCode, FrameType as T

pytestmark = pytest.mark.integration

GOOD_COUNT = 300
GOOD_DELAY_US = 10_000  # ~3 s of steady traffic while the bad clients come and go


# -- raw frames -----------------------------------------------------------------------------------


def corrupted_send() -> bytes:
    frame = bytearray(encode_frame(T.SEND, 0, 1, b"Hello wold #0!"))
    frame[-1] ^= 0x01  # a payload bit flipped after the CRC was computed
    return bytes(frame)


def error_doc(frame: tuple[int, int, int, bytes]) -> dict[str, Any]:
    ftype, flags, fid, payload = frame
    assert ftype == T.ERROR, f"expected an ERROR frame, got {T(ftype).name}"
    doc = msgpack.unpackb(payload, raw=False)
    assert isinstance(doc, dict) and set(doc) == {"code", "reason"}
    assert isinstance(doc["reason"], str) and doc["reason"].strip()
    return doc


# -- the environment: broker, good consumer, good producer ---------------------------------------------


@pytest.fixture(scope="module", params=LOOP_KINDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    loop = request.param
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    group = ProcGroup(tmp_path_factory.mktemp(f"bad_input_{loop}") / "teomq_home")
    try:
        broker = group.broker("-nomsg", "-stat", "-stat-interval", "0.25", loop=loop)
        consumer = group.start("consumer", f"-broker={broker.endpoint}", "-name", "good-c", "-loop", loop,
                               label="good-c")
        broker.proc.wait_for_line(r"consumer good-c connected from", stderr=True)
        producer = group.start("producer", f"-broker={broker.endpoint}", f"-count={GOOD_COUNT}",
                               f"-delay={GOOD_DELAY_US}", "-timeout=60", "-name", "good-p", "-loop", loop,
                               label="good-p")
        producer.wait_for_line(r"^good-p got answer: ")  # good traffic is flowing
        yield {"broker": broker, "port": broker.port, "consumer": consumer, "producer": producer}
    finally:
        group.cleanup()


def assert_logged(env: dict[str, Any], conn: RawConn, code: int) -> None:
    """The broker's WARNING about closing this connection, with the error code."""
    env["broker"].proc.wait_for_line(
        rf"WARNING teomq\.broker: closing connection {re.escape(conn.local)} .*: .+ \(error {int(code)}\)$",
        stderr=True)


FATAL_CASES = {
    # id: (bytes to send, expected code, WELCOME expected first)
    "garbage": (b"GET / HTTP/1.1\r\nHost: teomq.example\r\n\r\n", ErrorCode.BAD_FRAME, False),
    # shorter than a header: refused from its first bytes, not left to the handshake timer (HANDSHAKE)
    "short_garbage": (b"GET / HTTP/1.0\r\n\r\n", ErrorCode.BAD_FRAME, False),
    "short_bad_version": (b"TQ\x07", ErrorCode.BAD_FRAME, False),
    "bad_checksum": (hello() + corrupted_send(), ErrorCode.BAD_CHECKSUM, True),
    # only the header of a frame announcing 1 MiB + 1: refused before any payload
    "too_large": (hello() + raw_frame(T.SEND, 0, 1, length=DEFAULT_MAX_PAYLOAD + 1, crc=0), ErrorCode.TOO_LARGE, True),
    "unknown_type_42": (hello() + raw_frame(42, 0, 1, b"what is this"), ErrorCode.UNKNOWN_TYPE, True),
    "send_before_hello": (encode_frame(T.SEND, 0, 1, b"Hello wold #0!"), ErrorCode.HANDSHAKE, False),
    "bad_hello_version": (hello(v=2), ErrorCode.HANDSHAKE, False),
    "bad_hello_role": (hello(role="spectator"), ErrorCode.HANDSHAKE, False),
    "hello_not_a_map": (encode_frame(T.HELLO, 0, 0, msgpack.packb([1, "producer"])), ErrorCode.HANDSHAKE, False),
    "second_hello": (hello() + hello(), ErrorCode.HANDSHAKE, True),
    "bad_reserved_field": (hello() + struct.pack("<2sBBHHQI", b"TQ", 1, 8, 0, 7, 0, 0) + b"\0" * 4,
                           ErrorCode.BAD_FRAME, True),
    "bad_version": (hello() + b"TQ\x02" + encode_frame(T.PING, 0, 0)[3:], ErrorCode.BAD_FRAME, True),
}


@pytest.mark.parametrize("case", list(FATAL_CASES))
def test_fatal_bad_input_gets_error_and_close(env: dict[str, Any], case: str) -> None:
    data, code, welcomed = FATAL_CASES[case]
    conn = RawConn(env["port"])
    try:
        conn.send(data)
        frames = conn.read_until_eof()  # the broker closes the connection
    finally:
        conn.close()
    types = [T(f[0]).name for f in frames]
    assert types == (["WELCOME", "ERROR"] if welcomed else ["ERROR"]), types
    doc = error_doc(frames[-1])
    assert doc["code"] == code, doc
    assert frames[-1][2] == 0  # fatal errors carry id 0
    assert_logged(env, conn, code)


def test_unknown_delivery_id_is_refused_and_connection_stays(env: dict[str, Any]) -> None:
    conn = RawConn(env["port"])
    try:
        conn.send(hello(name="raw-a"))
        assert conn.read_frame()[0] == T.WELCOME
        conn.send(encode_frame(T.ANSWER, 0, 0xDEAD_BEEF_0001, b"an answer nobody asked for"))
        frame = conn.read_frame()
        doc = error_doc(frame)
        assert doc["code"] == ErrorCode.UNKNOWN_ID and frame[2] == 0xDEAD_BEEF_0001
        # not fatal: the connection still works
        conn.send(encode_frame(T.PING, 0, 77, b"still there?"))
        assert conn.read_frame() == (T.PONG, 0, 77, b"still there?")  # PONG echoes id and payload
    finally:
        conn.close()


@pytest.mark.parametrize("ftype", [T.DELIVER, T.REPLY, T.WELCOME], ids=lambda t: T(t).name)
def test_broker_only_frame_type_is_refused_but_connection_stays(env: dict[str, Any], ftype: int) -> None:
    conn = RawConn(env["port"])
    try:
        conn.send(hello(name="raw-n"))
        assert conn.read_frame()[0] == T.WELCOME
        conn.send(encode_frame(ftype, 0, 4242, b"not yours to send"))
        frame = conn.read_frame()
        doc = error_doc(frame)
        assert doc["code"] == ErrorCode.NOT_ALLOWED and frame[2] == 4242
        conn.send(encode_frame(T.PING, 0, 78, b""))
        assert conn.read_frame() == (T.PONG, 0, 78, b"")
    finally:
        conn.close()


def test_error_frame_from_client_is_logged_not_fatal(env: dict[str, Any]) -> None:
    conn = RawConn(env["port"])
    try:
        report = msgpack.packb({"code": int(ErrorCode.BAD_FRAME), "reason": "raw client complains early"})
        conn.send(encode_frame(T.ERROR, 0, 0, report))  # before HELLO: logged, not a handshake error
        conn.send(hello(name="raw-e"))
        assert conn.read_frame()[0] == T.WELCOME
        report = msgpack.packb({"code": int(ErrorCode.BAD_FRAME), "reason": "raw client complains again"})
        conn.send(encode_frame(T.ERROR, 0, 0, report))
        conn.send(encode_frame(T.PING, 0, 79, b"x"))
        assert conn.read_frame() == (T.PONG, 0, 79, b"x")
    finally:
        conn.close()
    broker = env["broker"].proc
    broker.wait_for_line(r"reported an error: raw client complains early \(code 1\)", stderr=True)
    broker.wait_for_line(r"producer raw-e .*reported an error: raw client complains again \(code 1\)", stderr=True)


def test_peer_vanishing_mid_frame_disturbs_nobody(env: dict[str, Any]) -> None:
    conn = RawConn(env["port"])
    send = encode_frame(T.SEND, 0, 1, b"half of this message never arrives")
    conn.send(hello(name="raw-half"))
    assert conn.read_frame()[0] == T.WELCOME
    conn.send(send[: len(send) // 2])
    conn.close()
    env["broker"].proc.wait_for_line(r"producer raw-half \(.*\) disconnected", stderr=True)
    # the broker still takes new connections and answers them
    probe = RawConn(env["port"])
    try:
        probe.send(hello(name="raw-probe") + encode_frame(T.PING, 0, 80, b"ping"))
        assert probe.read_frame()[0] == T.WELCOME
        assert probe.read_frame() == (T.PONG, 0, 80, b"ping")
    finally:
        probe.close()


def test_good_traffic_was_unharmed(env: dict[str, Any]) -> None:
    """Last in this module: the good producer got every answer once; nothing bad was accepted."""
    producer, consumer, broker = env["producer"], env["consumer"], env["broker"].proc
    rc = producer.wait()
    assert rc == 0, producer.describe()
    done = [m for m in map(DONE_RE.match, producer.lines) if m]
    assert [m.group(0) for m in done] == [f"good-p done: sent {GOOD_COUNT}, answered {GOOD_COUNT}, errors 0"]
    expected = [f"Hello wold #{n}!" for n in range(1, GOOD_COUNT + 1)]
    answers = [line.split(" got answer: ", 1)[1] for line in producer.lines if " got answer: " in line]
    assert collections.Counter(answers) == collections.Counter(f"Answer to {m}" for m in expected)
    # the broker took exactly the good producer's messages: no bad or partial frame was accepted
    broker.wait_until(
        lambda out, err: any((s := parse_stat(line)) and s["in"] == GOOD_COUNT and s["answered"] == GOOD_COUNT
                             and s["queue"] == 0 and s["inflight"] == 0 and s["consumers"] == 1
                             for line in out[-8:]),
        "a broker stat line with every good message answered")
    assert broker.alive and consumer.alive, broker.describe() + consumer.describe()
    assert consumer.terminate() == 0, consumer.describe()
    got = [line.split(" got message: ", 1)[1] for line in consumer.lines if " got message: " in line]
    assert collections.Counter(got) == collections.Counter(expected)
    assert broker.terminate() == 0, broker.describe()


# -- a connection that never says HELLO (the CLI has no handshake-timeout flag) -------------------------------


def test_silent_connection_gets_handshake_error(arun: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        broker = Broker(port=0, data_dir=tmp_path / "b", record_address=False, handshake_timeout=0.5)
        async with broker:
            silent_r, silent_w = await asyncio.open_connection("127.0.0.1", broker.port)
            # a peer that sent a few bytes but never a whole header is just as silent
            partial_r, partial_w = await asyncio.open_connection("127.0.0.1", broker.port)
            partial_w.write(hello()[:10])
            for reader, writer in ((silent_r, silent_w), (partial_r, partial_w)):
                data = await reader.read()  # to EOF: the broker closes after its ERROR
                frames = FrameDecoder(DEFAULT_MAX_PAYLOAD).feed(data)
                assert len(frames) == 1, frames
                doc = error_doc(frames[0])
                assert doc["code"] == ErrorCode.HANDSHAKE and "HELLO" in doc["reason"]
                writer.close()
            assert broker.stats()["errors"] == 2
            assert broker.stats()["connections"] == 0

    with caplog.at_level("WARNING", logger="teomq.broker"):
        arun(main())
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing connection")]
    assert len(closing) == 2 and all(m.endswith(f"(error {int(ErrorCode.HANDSHAKE)})") for m in closing), closing
