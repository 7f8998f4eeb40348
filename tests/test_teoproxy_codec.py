"""teoproxy packet codec: the Cython core and its pure-Python twin, against the spec and each other.

The spec is the docstring of teomq/_py/teoproxy.py. Every behaviour test runs on both; the
property tests then hold them to the same answer, exceptions included (type, reason, id, cmd).
"""

from __future__ import annotations

import array
import binascii
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teomq._core import teoproxy as core
from teomq._py import teoproxy as twin
from teomq.errors import BadPacket

each_impl = pytest.mark.parametrize("tp", [core, twin], ids=["core", "twin"])

# Written from the spec by hand: id u32 LE, cmd, data, sum of the bytes before mod 256.
VECTORS = [
    # (id, cmd byte, data, raw packet hex, base64 text)
    (0, 1, b"", "000000000101", "AAAAAAEB"),  # Connect
    (1, 5, b"hi", "0100000005" "6869" "d7", "AQAAAAVoadc="),  # SendTo: 1+5+0x68+0x69 = 0xd7
    (0x01020304, 0x85, b"no", "0403020185" "6e6f" "6c", "BAMCAYVub2w="),  # SendTo error: 364 mod 256
    (0xFFFFFFFF, 6, b"", "ffffffff0602", "/////wYC"),  # Stream: 4*255 + 6 = 1026 wraps to 2
    (0, 0, b"x", "0000000000" "78" "78", "AAAAAAB4eA=="),  # Stream push
]


def outcome(fn, *args, **kwargs):
    """What a call ends in, comparable across the two implementations."""
    try:
        r = fn(*args, **kwargs)
        return ("ok", type(r), r)
    except BadPacket as e:
        return ("BadPacket", e.reason, e.id, e.cmd, str(e), e.__cause__, e.__suppress_context__)
    except Exception as e:
        return (type(e), str(e))


def bad(tp, fn, *args, **kwargs) -> BadPacket:
    with pytest.raises(BadPacket) as info:
        getattr(tp, fn)(*args, **kwargs)
    assert str(info.value) == info.value.reason
    return info.value


# -- the spec ----------------------------------------------------------------------------------


def test_same_api_and_constants():
    assert core.__all__ == twin.__all__
    for name in core.__all__:
        if name.isupper():
            assert getattr(core, name) == getattr(twin, name), name
    assert core.Packet is twin.Packet
    assert (core.PUSH, core.CONNECT, core.STREAM, core.ERROR_BIT, core.MIN_PACKET) == (0, 1, 6, 0x80, 6)


@each_impl
@pytest.mark.parametrize(("pid", "cmd", "data", "raw_hex", "text"), VECTORS)
def test_vectors(tp, pid, cmd, data, raw_hex, text):
    raw = bytes.fromhex(raw_hex)
    assert tp.pack(pid, cmd, data) == raw
    assert tp.encode(pid, cmd, data) == text.encode()
    want = twin.Packet(pid, cmd & 0x7F, data, bool(cmd & 0x80))
    for got in (tp.unpack(raw, gateway=False), tp.decode(text, gateway=False), tp.decode(text.encode(), gateway=False)):
        assert got == want and type(got) is twin.Packet
    if cmd & 0x80:
        assert tp.encode_error(pid, cmd, data.decode()) == text.encode()


@each_impl
@pytest.mark.parametrize("cmd", range(7))
@pytest.mark.parametrize("data", [b"", b"\x00", b"num_players/42", bytes(range(256)) * 3])
def test_every_command_round_trips(tp, cmd, data):
    for pid in (0, 1, 0x12345678, 0xFFFFFFFF):
        text = tp.encode(pid, cmd, data)
        assert set(text) <= set(string.ascii_letters.encode() + string.digits.encode() + b"+/=")
        assert len(text) % 4 == 0
        assert tp.decode(text, gateway=cmd != 0) == (pid, cmd, data, False)
        assert tp.decode(text.decode(), gateway=False) == (pid, cmd, data, False)
        assert tp.unpack(tp.pack(pid, cmd, data), gateway=False) == (pid, cmd, data, False)


@each_impl
def test_error_packets(tp):
    for cmd in range(7):
        raw = binascii.a2b_base64(tp.encode_error(9, cmd, "no such peer"))
        assert raw[4] == cmd | 0x80 and raw[5:-1] == b"no such peer" and raw[-1] == sum(raw[:-1]) % 256
        assert tp.decode(tp.encode_error(9, cmd, "no such peer"), gateway=cmd != 0) == (9, cmd, b"no such peer", True)
    # cmd is masked to 7 bits (any int), the reason is UTF-8 with "?" for what cannot be encoded
    assert tp.encode_error(1, 0x85, "x") == tp.encode_error(1, 5, "x") == tp.encode_error(1, 0x305, "x")
    assert tp.encode_error(1, -1, "") == tp.encode(1, 0xFF, b"")
    assert tp.decode(tp.encode_error(1, 5, "é\udc80")).data == "é?".encode()


@each_impl
def test_checksum(tp):
    assert tp.checksum(b"") == 0
    assert tp.checksum(b"\x01\x02\x03") == 6
    assert tp.checksum(b"\xff\xff") == 0xFE
    assert tp.checksum(b"\x80\x80") == 0
    assert tp.checksum(bytes(range(256))) == 128  # 32640 mod 256
    assert tp.checksum(b"\xff" * 100_001) == (255 * 100_001) % 256
    assert tp.checksum(bytearray(b"\x10\x20")) == tp.checksum(memoryview(b"\x10\x20")) == 0x30
    assert tp.checksum(array.array("H", [0x0102])) == 3


# -- what is refused, and how ---------------------------------------------------------------------


@each_impl
@pytest.mark.parametrize("text", ["", b"", bytearray()])
def test_empty_text(tp, text):
    e = bad(tp, "decode", text)
    assert (e.reason, e.id, e.cmd) == ("not enough data: 0 bytes, a packet has at least 6", 0, 0)


@each_impl
@pytest.mark.parametrize("text", ["AAAAAAE", "AAAAA", "=AAAAAEB", "AAAA=AEB", "AB=C", "AA==AA==", "AAAAAAEB\n",
                                  "AAAA AAEB", "AAAAAAE*", b"AAAAAAE\xff", "AAA=A"])
def test_bad_base64(tp, text):
    try:
        binascii.a2b_base64(text.encode() if isinstance(text, str) else text, strict_mode=True)
    except binascii.Error as err:
        assert bad(tp, "decode", text).reason == f"bad base64: {err}"
    else:
        pytest.fail(f"binascii accepted {text!r}")


@each_impl
@pytest.mark.parametrize("text", ["AAAAAAE€", "AAAAAAEB\u0100", "\U0001F600"])
def test_non_ascii_text(tp, text):
    assert bad(tp, "decode", text).reason == "bad base64: the text is not ASCII"


@each_impl
def test_base64_strict_mode_leniencies_are_shared(tp):
    # binascii's strict mode takes "=" after a full quad, and ignores the unused bits of the last
    # character; the core hands anything it does not decode itself to binascii, so both agree
    assert tp.decode("AAAAAAEB==") == tp.decode("AAAAAAEB=") == (0, 1, b"", False)
    assert tp.decode("AAAAAAB4eB==", gateway=False) == tp.decode("AAAAAAB4eA==", gateway=False)


@each_impl
@pytest.mark.parametrize("n", range(6))
def test_short_packets(tp, n):
    for raw in (bytes(n), b"\xff" * n):
        reason = f"not enough data: {n} bytes, a packet has at least 6"
        for e in (bad(tp, "unpack", raw), bad(tp, "decode", binascii.b2a_base64(raw, newline=False))):
            assert (e.reason, e.id, e.cmd) == (reason, 0, 0)


@each_impl
def test_bad_checksum(tp):
    raw = bytearray(tp.pack(0x0A0B0C0D, 5, b"hello"))
    raw[-1] ^= 0x01
    e = bad(tp, "unpack", raw)
    good = sum(raw[:-1]) % 256
    assert e.reason == f"wrong checksum: 0x{good ^ 1:02x} in the packet, 0x{good:02x} computed"
    assert (e.id, e.cmd) == (0x0A0B0C0D, 5)
    assert outcome(tp.decode, binascii.b2a_base64(raw, newline=False)) == outcome(tp.unpack, raw)


@each_impl
def test_every_single_bit_flip_is_refused(tp):
    raw = tp.pack(0x01020304, 5, b"peer\x00payload")
    for i in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        e = bad(tp, "unpack", flipped)  # a sum mod 256 sees every single-bit change
        assert e.reason.startswith("wrong checksum")
        assert (e.id, e.cmd) == (int.from_bytes(flipped[:4], "little"), flipped[4])
    text = tp.encode(0x01020304, 5, b"peer\x00payload")
    for i in range(len(text) * 8):
        flipped = bytearray(text)
        flipped[i // 8] ^= 1 << (i % 8)
        try:
            got = tp.decode(flipped)
        except BadPacket:
            continue
        # the only way back to the same packet: a bit base64 leaves unused in its last character
        assert got != tp.decode(text) or i // 8 == len(text.rstrip(b"=")) - 1, i


@each_impl
def test_large_packets(tp):
    data = bytes(range(256)) * 300  # past any on-stack buffer
    text = tp.encode(5, 6, data)
    assert tp.decode(text) == (5, 6, data, False)
    broken = text[:50_000] + b"*" + text[50_001:]
    assert outcome(tp.decode, broken) == outcome(twin.decode, broken)
    assert bad(tp, "decode", text[:-1] + b"=").reason.startswith("wrong checksum")


@each_impl
def test_unknown_commands(tp):
    for cmd in [0, *range(7, 128)]:
        for cmd_byte in (cmd, cmd | 0x80):
            raw = tp.pack(77, cmd_byte, b"d")
            for e in (bad(tp, "unpack", raw), bad(tp, "decode", tp.encode(77, cmd_byte, b"d"))):
                assert (e.reason, e.id, e.cmd) == (f"unknown command {cmd}", 77, cmd_byte)
            assert tp.unpack(raw, gateway=False) == (77, cmd, b"d", cmd_byte != cmd)
    assert tp.decode(tp.encode(0, 0, b"x"), gateway=False) == (0, core.PUSH, b"x", False)


@each_impl
def test_argument_errors(tp):
    for fn in (tp.checksum, tp.unpack, tp.decode):
        with pytest.raises(TypeError):
            fn(None)
    for fn in (tp.checksum, tp.unpack, lambda s: tp.pack(0, 1, s), lambda s: tp.encode(0, 1, s)):
        with pytest.raises(TypeError, match="a bytes-like object is required, not 'str'"):
            fn("AAAAAAEB")
    for pid, cmd in ((-1, 1), (2**32, 1), (2**64, 1), (-(2**70), 1), (0, -1), (0, 256), (0, 2**65)):
        for fn in (tp.pack, tp.encode):
            with pytest.raises(OverflowError, match="cmd" if pid == 0 else "id"):
                fn(pid, cmd)
    with pytest.raises(OverflowError):
        tp.encode_error(-1, 1, "x")


ODD_ARGS = [(True, False, b""), (1.0, 1, b""), (1, 1.5, b""), (None, 1, b""), (1, None, b""), ("1", 1, b""),
            (1, 1, None), (1, 1, 5), (1, 1, memoryview(b"abcdef")[::2]), (1, 1, array.array("I", [1, 2])),
            (1, 300, None), (2**40, 1.0, None), (1, 1, memoryview(b"ab").cast("B", (1, 2)))]


@pytest.mark.parametrize("args", ODD_ARGS, ids=[str(i) for i in range(len(ODD_ARGS))])
def test_odd_arguments_fail_alike(args):
    for name in ("pack", "encode"):
        assert outcome(getattr(core, name), *args) == outcome(getattr(twin, name), *args), name
    assert outcome(core.encode_error, args[0], args[1], "r") == outcome(twin.encode_error, args[0], args[1], "r")
    for value in args:
        for name in ("checksum", "unpack", "decode"):
            assert outcome(getattr(core, name), value) == outcome(getattr(twin, name), value), (name, value)


def test_bytes_like_inputs_alike():
    raw = core.pack(3, 5, b"abc")
    text = core.encode(3, 5, b"abc")
    for kind in (bytes, bytearray, memoryview, lambda b: array.array("B", b), lambda b: memoryview(b * 2)[::2]):
        for name, value in (("unpack", kind(raw)), ("decode", kind(text)), ("checksum", kind(raw))):
            assert outcome(getattr(core, name), value) == outcome(getattr(twin, name), value)
    assert core.decode(bytearray(text)) == core.decode(text.decode()) == (3, 5, b"abc", False)


# -- core and twin agree ----------------------------------------------------------------------------

B64_CHARS = string.ascii_letters + string.digits + "+/="
texts = st.one_of(
    st.text(B64_CHARS, max_size=40),
    st.text(B64_CHARS + " \n-_*\x00é", max_size=40),
    st.binary(max_size=40).map(lambda b: binascii.b2a_base64(b, newline=False)),
    st.binary(max_size=40),
)
packets = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_agree_on_random_raw_packets(raw, gateway):
    assert outcome(core.unpack, raw, gateway=gateway) == outcome(twin.unpack, raw, gateway=gateway)
    assert outcome(core.checksum, raw) == outcome(twin.checksum, raw)


@settings(max_examples=600, deadline=None)
@given(texts, st.booleans())
def test_agree_on_random_text(text, gateway):
    assert outcome(core.decode, text, gateway=gateway) == outcome(twin.decode, text, gateway=gateway)


@settings(max_examples=300, deadline=None)
@given(packets, st.booleans(), st.integers(0, 7))
def test_agree_on_valid_and_nearly_valid_packets(packet, gateway, cut):
    pid, cmd, data = packet
    text = core.encode(pid, cmd, data)
    assert text == twin.encode(pid, cmd, data)
    assert core.pack(pid, cmd, data) == twin.pack(pid, cmd, data)
    for t in (text, text.decode(), text[: len(text) - cut], text + b"=" * cut):
        assert outcome(core.decode, t, gateway=gateway) == outcome(twin.decode, t, gateway=gateway)


@settings(max_examples=300, deadline=None)
@given(packets, st.text(max_size=50))
def test_round_trip(packet, reason):
    pid, cmd, data = packet
    for tp in (core, twin):
        want = (pid, cmd & 0x7F, data, bool(cmd & 0x80))
        assert tp.unpack(tp.pack(pid, cmd, data), gateway=False) == want
        assert tp.decode(tp.encode(pid, cmd, data), gateway=False) == want
        assert tp.decode(tp.encode_error(pid, cmd, reason), gateway=False) == (
            pid, cmd & 0x7F, reason.encode("utf-8", "replace"), True)
