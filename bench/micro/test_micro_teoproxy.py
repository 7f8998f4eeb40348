"""teoproxy packet codec (the WebSocket gateway's wire format): the Cython core against the pure-Python twin.

Groups:
    teoproxy-encode-20B    encode() of a Stream push carrying 20 bytes ("num_players/42" padded):
                           what the gateway sends a subscribed browser per update.
    teoproxy-decode-sendto decode() of a SendTo packet as a browser sends it (str text, 32 bytes of data).
    teoproxy-encode-64KiB  encode() of a Stream push carrying 64 KiB.
    teoproxy-decode-64KiB  decode() of the text of a 64 KiB SendTo packet.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest

import teomq._core.teoproxy as c_tp
import teomq._py.teoproxy as py_tp

assert c_tp.__file__ is not None and not c_tp.__file__.endswith(".py"), "build the core first"

PUSH_DATA = b"num_players/42".ljust(20, b" ")
SENDTO_TEXT = c_tp.encode(7, c_tp.SEND_TO, b"peer-42\x00" + os.urandom(24)).decode("ascii")
BIG = os.urandom(64 * 1024)
BIG_TEXT = c_tp.encode(7, c_tp.SEND_TO, BIG)

CODECS = [pytest.param(c_tp, id="C"), pytest.param(py_tp, id="pure")]


@pytest.mark.benchmark(group="teoproxy-encode-20B")
@pytest.mark.parametrize("tp", CODECS)
def test_encode_push(benchmark: Any, report: Any, tp: ModuleType) -> None:
    text = benchmark(tp.encode, 0, tp.PUSH, PUSH_DATA)
    assert text == c_tp.encode(0, 0, PUSH_DATA)
    report(item="packet")


@pytest.mark.benchmark(group="teoproxy-decode-sendto")
@pytest.mark.parametrize("tp", CODECS)
def test_decode_sendto(benchmark: Any, report: Any, tp: ModuleType) -> None:
    packet = benchmark(tp.decode, SENDTO_TEXT)
    assert packet.cmd == tp.SEND_TO and len(packet.data) == 32
    report(item="packet")


@pytest.mark.benchmark(group="teoproxy-encode-64KiB")
@pytest.mark.parametrize("tp", CODECS)
def test_encode_64k(benchmark: Any, report: Any, tp: ModuleType) -> None:
    assert benchmark(tp.encode, 7, tp.STREAM, BIG) == c_tp.encode(7, c_tp.STREAM, BIG)
    report(item="packet", nbytes=len(BIG))


@pytest.mark.benchmark(group="teoproxy-decode-64KiB")
@pytest.mark.parametrize("tp", CODECS)
def test_decode_64k(benchmark: Any, report: Any, tp: ModuleType) -> None:
    assert benchmark(tp.decode, BIG_TEXT).data == BIG
    report(item="packet", nbytes=len(BIG))
