"""CRC32C: published vectors, and the hardware path, the table path and the pure twin agreeing."""

from __future__ import annotations

import array
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teomq._core import crc32c as core
from teomq._py import crc32c as twin

IMPLS = {
    "core": core.crc32c,
    "core_software": core.crc32c_software,
    "twin": twin.crc32c,
}
impl_params = pytest.mark.parametrize("crc", list(IMPLS.values()), ids=list(IMPLS))

# Published answers: the CRC catalogue's check value ("CRC-32/ISCSI"), the five vectors of
# RFC 3720 (iSCSI) appendix B.4, and two widely quoted strings.
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (
        bytes.fromhex(
            "01c00000000000000000000000000000" "14000000000004000000001400000018" "28000000000000000200000000000000"
        ),
        0xD9963A56,
    ),
    (b"a", 0xC1D04330),
    (b"The quick brown fox jumps over the lazy dog", 0x22620404),
]


def bitwise_crc32c(data: bytes, crc: int = 0) -> int:
    """The definition, one bit at a time: reflected polynomial 0x82F63B78, init and xorout ~0."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@impl_params
@pytest.mark.parametrize(("data", "expected"), VECTORS, ids=[f"vector{i}" for i in range(len(VECTORS))])
def test_known_vectors(crc, data, expected):
    assert crc(data) == expected


@pytest.mark.parametrize(("data", "expected"), VECTORS, ids=[f"vector{i}" for i in range(len(VECTORS))])
def test_bitwise_definition_matches_vectors(data, expected):
    # Keeps the reference used below honest.
    assert bitwise_crc32c(data) == expected


@impl_params
def test_empty_input_returns_the_running_crc(crc):
    assert crc(b"", 0xDEADBEEF) == 0xDEADBEEF
    assert crc(b"") == 0


@impl_params
def test_every_length_and_alignment_up_to_40_bytes(crc):
    # Covers the head loop (unaligned start), the word loop and the tail loop of every implementation.
    base = bytes((i * 37 + 11) & 0xFF for i in range(64))
    for start in range(8):
        for n in range(41):
            chunk = base[start : start + n]
            assert crc(chunk) == bitwise_crc32c(chunk), (start, n)


@impl_params
def test_accepts_buffer_types(crc):
    data = b"123456789"
    assert crc(bytearray(data)) == 0xE3069283
    assert crc(memoryview(data)) == 0xE3069283
    assert crc(memoryview(b"xx123456789xx")[2:-2]) == 0xE3069283
    assert crc(array.array("B", data)) == 0xE3069283


@pytest.mark.parametrize("crc", [core.crc32c, twin.crc32c], ids=["core", "twin"])
def test_refuses_what_the_core_refuses(crc):
    with pytest.raises(TypeError):
        crc("123456789")
    with pytest.raises(ValueError):
        crc(array.array("i", [1, 2]))
    with pytest.raises(BufferError):
        crc(memoryview(b"abcdef")[::2])
    with pytest.raises(OverflowError):
        crc(b"x", -1)
    with pytest.raises(OverflowError):
        crc(b"x", 1 << 32)


def test_hardware_reports_a_bool():
    assert isinstance(core.hardware(), bool)
    assert twin.hardware() is False


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_implementations_agree(data):
    expected = core.crc32c_software(data)
    assert core.crc32c(data) == expected
    assert twin.crc32c(data) == expected


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_twin_matches_the_definition(data):
    assert twin.crc32c(data) == bitwise_crc32c(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.data())
def test_continuation_at_any_split(data, draw):
    a = draw.draw(st.integers(0, len(data)), label="first split")
    b = draw.draw(st.integers(a, len(data)), label="second split")
    whole = core.crc32c_software(data)
    for crc in IMPLS.values():
        assert crc(data[b:], crc(data[a:b], crc(data[:a]))) == whole
        assert crc(data[a:], crc(data[:a])) == whole


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), st.integers(0, 0xFFFFFFFF))
def test_implementations_agree_from_any_starting_crc(data, start):
    expected = core.crc32c_software(data, start)
    assert core.crc32c(data, start) == expected
    assert twin.crc32c(data, start) == expected


def test_forced_table_path_in_a_fresh_process():
    # TEOMQ_CRC32C_SOFTWARE is read once, at the first call; a child process sees it from the start.
    code = (
        "from teomq._core import crc32c as c; "
        "assert c.hardware() is False; "
        "assert c.crc32c(b'123456789') == 0xE3069283; "
        "assert c.crc32c(b'6789', c.crc32c(b'12345')) == 0xE3069283; "
        "import random; b = random.Random(7).randbytes(70001); h, g = b'h' * 20, b'g' * 20; "
        "assert c.reframe_crc(c.crc32c(h + b), c.crc32c(h), c.crc32c(g), len(b)) == c.crc32c(g + b); "
        "print('ok')"
    )
    env = dict(os.environ, TEOMQ_CRC32C_SOFTWARE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20000), st.binary(min_size=20, max_size=20), st.binary(min_size=20, max_size=20))
def test_reframe_crc_equals_recomputing(payload, head, new_head):
    got = core.reframe_crc(core.crc32c(head + payload), core.crc32c(head), core.crc32c(new_head), len(payload))
    assert got == core.crc32c(new_head + payload)


@settings(max_examples=150, deadline=None)
@given(st.integers(100, 70000), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_three_way_path_matches_table(n, start, seed):
    # from 128 bytes the hardware path splits the buffer in three streams and joins their CRCs
    data = random.Random(seed).randbytes(n)
    assert core.crc32c(data, start) == core.crc32c_software(data, start)


@pytest.mark.parametrize("n", [196_607, 196_608, 200_003, 1 << 20, (1 << 20) + 77])
def test_thirds_past_64_kib_join_right(n):
    # thirds of 64 KiB or more take shift factors from the table of powers past 2^16 bytes
    data = random.Random(n).randbytes(n)
    assert core.crc32c(data, 0x1234) == core.crc32c_software(data, 0x1234)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3 << 20), st.binary(min_size=20, max_size=20), st.binary(min_size=20, max_size=20))
def test_reframe_crc_of_any_length_up_to_3_mib(n, head, new_head):
    # every part of the shift factor: both 256-entry tables and the powers from 2^16 bytes up
    payload = random.Random(n).randbytes(n)
    got = core.reframe_crc(core.crc32c(head + payload), core.crc32c(head), core.crc32c(new_head), n)
    assert got == core.crc32c_software(new_head + payload)
