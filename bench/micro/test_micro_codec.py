"""Frame codec and CRC32C: the Cython core against the pure-Python twin, side by side.

Groups:
    encode-100B        encode_frame of one 100-byte SEND frame; WriteBuffer.add + take of one
                       (the client's write path: add per frame, take once per loop pass).
    decode-1000x100B   FrameDecoder.feed of one read holding 1,000 complete 100-byte frames
                       (124,000 bytes); every frame comes back as a (type, flags, id, bytes) tuple.
    crc32c-1MiB        CRC32C of 1 MiB: C with the CPU instruction (if the CPU has it), C tables,
                       pure Python (few rounds: about a tenth of a second each).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest

import teomq._core.crc32c as c_crc
import teomq._core.frame_codec as c_codec
import teomq._py.crc32c as py_crc
import teomq._py.frame_codec as py_codec

SEND = 3
PAYLOAD = os.urandom(100)
FRAMES = 1000
READ = b"".join(c_codec.encode_frame(SEND, 0, i + 1, PAYLOAD) for i in range(FRAMES))
MIB = os.urandom(1 << 20)

CODECS = [pytest.param(c_codec, id="C"), pytest.param(py_codec, id="pure")]


@pytest.mark.benchmark(group="encode-100B")
@pytest.mark.parametrize("codec", CODECS)
def test_encode_frame(benchmark: Any, report: Any, codec: ModuleType) -> None:
    out = benchmark(codec.encode_frame, SEND, 0, 123456789, PAYLOAD)
    assert len(out) == 124
    report(items=1, item="frame")


@pytest.mark.benchmark(group="encode-100B")
@pytest.mark.parametrize("codec", CODECS)
def test_writebuffer_add_take(benchmark: Any, report: Any, codec: ModuleType) -> None:
    wb = codec.WriteBuffer(16384)

    def add_take() -> bytes:
        wb.add(SEND, 0, 123456789, PAYLOAD)
        return wb.take()

    assert len(benchmark(add_take)) == 124
    report(items=1, item="frame")


@pytest.mark.benchmark(group="decode-1000x100B")
@pytest.mark.parametrize("codec", CODECS)
def test_decode_read(benchmark: Any, report: Any, codec: ModuleType) -> None:
    dec = codec.FrameDecoder(1 << 20)  # reused: each read holds whole frames, so it ends empty
    frames = benchmark(dec.feed, READ)
    assert len(frames) == FRAMES and dec.buffered == 0
    report(items=FRAMES, item="frame", nbytes=len(READ))


@pytest.mark.benchmark(group="crc32c-1MiB")
def test_crc32c_c_hardware(benchmark: Any, report: Any) -> None:
    value = benchmark(c_crc.crc32c, MIB)
    assert value == c_crc.crc32c_software(MIB)
    # without the instruction this is the table code again: say so next to the figure
    report(nbytes=len(MIB), item="MiB", hardware=c_crc.hardware())


@pytest.mark.benchmark(group="crc32c-1MiB")
def test_crc32c_c_software(benchmark: Any, report: Any) -> None:
    benchmark(c_crc.crc32c_software, MIB)
    report(nbytes=len(MIB), item="MiB")


@pytest.mark.benchmark(group="crc32c-1MiB")
def test_crc32c_pure(benchmark: Any, report: Any) -> None:
    # ~80 ms a call: a few rounds are enough for a median, and keep the suite short
    value = benchmark.pedantic(py_crc.crc32c, args=(MIB,), rounds=5, warmup_rounds=1, iterations=1)
    assert value == c_crc.crc32c(MIB)
    report(nbytes=len(MIB), item="MiB")
