"""Frame codec: the Cython core and its pure-Python twin, against the spec and against each other.

Streams are fed whole, byte at a time and in random chunks (h11's fuzzing habit); corrupted
streams must end in ProtocolError with the code the spec gives, never in another exception.
"""

from __future__ import annotations

import array
import struct
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from teomq._core import frame_codec as core
from teomq._py import frame_codec as twin
from teomq._py.crc32c import crc32c
from teomq.errors import ProtocolError
from teomq.protocol import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, MAX_FRAME_TYPE, ErrorCode, Flag, FrameType

CODECS = [core, twin]
CODEC_IDS = ["core", "twin"]
each_codec = pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)

U64_MAX = (1 << 64) - 1
HEADER = struct.Struct("<2sBBHHQII")  # magic version type flags reserved id length crc
HELLO_FRAME = bytes.fromhex("54510103010000002a00000000000000050000003243ed3c68656c6c6f")

# -- shared helpers -------------------------------------------------------------------------------

Frame = tuple  # (type, flags, id, payload)


def frames_st(max_payload: int = 4096, max_frames: int = 8) -> st.SearchStrategy[list[Frame]]:
    frame = st.tuples(
        st.integers(1, MAX_FRAME_TYPE),
        st.integers(0, 0xFFFF),
        st.integers(0, U64_MAX),
        st.binary(max_size=max_payload),
    )
    return st.lists(frame, max_size=max_frames)


def raw_frame(ftype: int, flags: int, fid: int, payload: bytes = b"", *, magic: bytes = b"TQ",
              version: int = 1, reserved: int = 0, length: int | None = None, crc: int | None = None) -> bytes:
    """Build a frame field by field, valid or not (the codecs refuse to encode invalid ones)."""
    if length is None:
        length = len(payload)
    head = HEADER.pack(magic, version, ftype, flags, reserved, fid, length, 0)[:20]
    if crc is None:
        crc = crc32c(payload, crc32c(head))
    return head + struct.pack("<I", crc) + payload


def encode_all(codec, frames: list[Frame]) -> bytes:
    wb = codec.WriteBuffer()
    for f in frames:
        wb.add(*f)
    return wb.take()


class Outcome(NamedTuple):
    frames: list  # every frame handed out before the stream ended or failed
    code: int | None  # ProtocolError code, None when no error
    buffered: int  # bytes held at the end (0 after an error)


def run(codec, chunks, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Outcome:
    """Feed chunks in order; any exception other than ProtocolError fails the test."""
    dec = codec.FrameDecoder(max_payload)
    got: list = []
    for chunk in chunks:
        try:
            out = dec.feed(chunk)
        except ProtocolError as exc:
            assert exc.code in set(ErrorCode)
            # Poisoned: the same error object again, whatever comes next, and nothing held.
            for later in (b"", HELLO_FRAME):
                with pytest.raises(ProtocolError) as again:
                    dec.feed(later)
                assert again.value is exc
            assert dec.buffered == 0
            return Outcome(got, exc.code, 0)
        for f in out:
            assert type(f) is tuple and len(f) == 4 and type(f[3]) is bytes
        got.extend(out)
    return Outcome(got, None, dec.buffered)


def whole(stream: bytes) -> list[bytes]:
    return [stream]


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def split_at(stream: bytes, cuts) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in zip(points, points[1:])]


def chunkings(draw, stream: bytes) -> dict[str, list[bytes]]:
    cuts = draw.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    return {"whole": whole(stream), "bytewise": bytewise(stream), "random": split_at(stream, cuts)}


def spec_header_verdict(header: bytes, max_payload: int) -> int | None:
    """What the spec says of 24 header bytes: the first failing check's code, or None (read on)."""
    magic, version, ftype, _flags, reserved, _fid, length, _crc = HEADER.unpack(header)
    if magic != b"TQ" or version != 1 or reserved != 0:
        return ErrorCode.BAD_FRAME
    if not 1 <= ftype <= 13:  # the spec (docs/protocol.md): types 1..13
        return ErrorCode.UNKNOWN_TYPE
    if length > max_payload:
        return ErrorCode.TOO_LARGE
    return None


# -- encoding ---------------------------------------------------------------------------------------


@each_codec
def test_known_byte_layout(codec):
    frame = codec.encode_frame(3, 1, 42, b"hello")
    assert frame == HELLO_FRAME
    assert HEADER.unpack(frame[:HEADER_SIZE]) == (b"TQ", 1, 3, 1, 0, 42, 5, 0x3CED4332)
    assert struct.unpack("<I", frame[20:24])[0] == crc32c(b"hello", crc32c(frame[:20]))


@each_codec
def test_empty_payload_and_extremes(codec):
    frame = codec.encode_frame(FrameType.PONG, 0xFFFF, U64_MAX)
    assert len(frame) == HEADER_SIZE
    assert frame == raw_frame(9, 0xFFFF, U64_MAX)
    assert codec.encode_frame(1, 0, 0, bytearray(b"ab")) == codec.encode_frame(1, 0, 0, b"ab")
    assert codec.encode_frame(1, 0, 0, memoryview(b"xaby")[1:3]) == codec.encode_frame(1, 0, 0, b"ab")
    assert codec.encode_frame(1, 0, 0, array.array("B", b"ab")) == codec.encode_frame(1, 0, 0, b"ab")
    assert codec.encode_frame(ftype=1, flags=0, fid=0, payload=b"ab") == codec.encode_frame(1, 0, 0, b"ab")


@settings(max_examples=250, deadline=None)
@given(frames_st())
def test_encoders_agree(frames):
    for f in frames:
        assert core.encode_frame(*f) == twin.encode_frame(*f) == raw_frame(*f)
    expected = b"".join(raw_frame(*f) for f in frames)
    for codec in CODECS:
        wb = codec.WriteBuffer(16)
        for f in frames:
            wb.add(*f)
        assert len(wb) == len(expected)
        assert wb.take() == expected
        assert len(wb) == 0
        assert wb.take() == b""


@each_codec
def test_write_buffer_is_reusable(codec):
    wb = codec.WriteBuffer()
    wb.add(8, 0, 1)
    assert wb.take() == codec.encode_frame(8, 0, 1)
    wb.add(9, 0, 1)
    wb.add(3, Flag.NO_REPLY, 7, b"x" * 10000)  # past the initial 4096 bytes
    assert wb.take() == codec.encode_frame(9, 0, 1) + codec.encode_frame(3, 1, 7, b"x" * 10000)


BAD_ADD_ARGS = [
    pytest.param((0, 0, 0), ValueError, id="type 0"),
    pytest.param((MAX_FRAME_TYPE + 1, 0, 0), ValueError, id="type past the last"),
    pytest.param((-1, 0, 0), ValueError, id="type -1"),
    pytest.param((255, 0, 0), ValueError, id="type 255"),
    pytest.param((3, -1, 0), ValueError, id="flags -1"),
    pytest.param((3, 0x10000, 0), ValueError, id="flags 0x10000"),
    pytest.param((1 << 40, 0, 0), ValueError, id="type over C int"),
    pytest.param((3, 1 << 40, 0), ValueError, id="flags over C int"),
    pytest.param((3, 0, -1), OverflowError, id="id -1"),
    pytest.param((3, 0, 1 << 64), OverflowError, id="id 2**64"),
    pytest.param((3, 0, 0, "text"), TypeError, id="str payload"),
    pytest.param((3, 0, 0, 5), TypeError, id="int payload"),
    pytest.param((3, 0, 0, array.array("i", [1])), ValueError, id="int array payload"),
    pytest.param((3, 0, 0, memoryview(b"abcd")[::2]), BufferError, id="strided payload"),
    pytest.param(("3", 0, 0), TypeError, id="str type"),
]


@each_codec
@pytest.mark.parametrize(("args", "error"), BAD_ADD_ARGS)
def test_add_refuses_bad_arguments_and_writes_nothing(codec, args, error):
    wb = codec.WriteBuffer()
    wb.add(8, 0, 5)
    with pytest.raises(error):
        wb.add(*args)
    assert len(wb) == HEADER_SIZE
    assert wb.take() == codec.encode_frame(8, 0, 5)
    with pytest.raises(error):
        codec.encode_frame(*args)


# Numbers must be ints (or __index__ objects), never floats truncated on the way; None is no buffer.
@pytest.mark.parametrize("codec", [core, twin], ids=CODEC_IDS)
@pytest.mark.parametrize("args", [(3, 0, 1.5), (3.0, 0, 1), (3, 0.0, 1)], ids=["float id", "float type", "float flags"])
def test_add_refuses_non_integer_numbers(codec, args):
    with pytest.raises(TypeError):
        codec.WriteBuffer().add(*args)


@pytest.mark.parametrize("codec", [core, twin], ids=CODEC_IDS)
def test_none_is_not_a_buffer(codec):
    with pytest.raises(TypeError):
        codec.WriteBuffer().add(3, 0, 1, None)
    with pytest.raises(TypeError):
        codec.FrameDecoder().feed(None)


# -- decoding valid streams -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(frames_st(), st.data())
def test_decoders_return_the_frames_whole_and_chunked(frames, draw):
    stream = encode_all(core, frames)
    for chunks in (whole(stream), split_at(stream, draw.draw(st.lists(st.integers(0, len(stream)), max_size=20)))):
        for codec in CODECS:
            assert run(codec, chunks) == Outcome(frames, None, 0)


@settings(max_examples=100, deadline=None)
@given(frames_st(max_payload=200, max_frames=5))
def test_decoders_return_the_frames_byte_by_byte(frames):
    stream = encode_all(core, frames)
    for codec in CODECS:
        assert run(codec, bytewise(stream)) == Outcome(frames, None, 0)


@settings(max_examples=100, deadline=None)
@given(frames_st(max_payload=600), st.data())
def test_truncated_stream_waits_and_completes(frames, draw):
    assume(frames)
    stream = encode_all(core, frames)
    cut = draw.draw(st.integers(0, len(stream)), label="cut")
    complete, end = [], 0
    for f in frames:
        size = HEADER_SIZE + len(f[3])
        if end + size > cut:
            break
        complete.append(f)
        end += size
    for codec in CODECS:
        dec = codec.FrameDecoder()
        assert dec.feed(stream[:cut]) == complete
        assert dec.buffered == cut - end
        assert dec.feed(stream[cut:]) == frames[len(complete) :]
        assert dec.buffered == 0


@each_codec
def test_decoder_copies_its_input(codec):
    data = bytearray(HELLO_FRAME)
    dec = codec.FrameDecoder()
    assert dec.feed(data[:10]) == []
    view = memoryview(data)
    assert dec.feed(view[10:20]) == []
    data[0:20] = bytes(20)  # must not reach the bytes already fed
    assert dec.feed(HELLO_FRAME[20:]) == [(3, 1, 42, b"hello")]


@each_codec
def test_payload_at_the_limit_is_accepted(codec):
    frame = codec.encode_frame(3, 0, 1, b"x" * 100)
    assert codec.FrameDecoder(100).feed(frame) == [(3, 0, 1, b"x" * 100)]
    assert codec.FrameDecoder(0).feed(codec.encode_frame(9, 0, 1)) == [(9, 0, 1, b"")]
    with pytest.raises(ProtocolError) as err:
        codec.FrameDecoder(99).feed(frame)
    assert err.value.code == ErrorCode.TOO_LARGE


@each_codec
def test_max_payload_is_a_read_only_u32(codec):
    assert codec.FrameDecoder().max_payload == DEFAULT_MAX_PAYLOAD
    assert codec.FrameDecoder(max_payload=0xFFFFFFFF).max_payload == 0xFFFFFFFF
    with pytest.raises(OverflowError):
        codec.FrameDecoder(-1)
    with pytest.raises(OverflowError):
        codec.FrameDecoder(1 << 32)
    dec = codec.FrameDecoder(10)
    with pytest.raises(AttributeError):
        dec.max_payload = 20
    with pytest.raises(AttributeError):
        dec.buffered = 3
    assert dec.max_payload == 10


# -- decoding bad streams ---------------------------------------------------------------------------


def assert_refused(chunks, code, max_payload=DEFAULT_MAX_PAYLOAD):
    outcomes = [run(codec, chunks, max_payload) for codec in CODECS]
    assert outcomes[0].code == code, outcomes[0]
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("magic", [b"\x00\x00", b"QT", b"Tq", b"tQ", b"T\x00", b"\xffQ"])
def test_bad_magic(magic):
    assert_refused(whole(raw_frame(3, 0, 1, b"abc", magic=magic)), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("version", [0, 2, 0x81, 255])
def test_bad_version(version):
    assert_refused(whole(raw_frame(3, 0, 1, b"abc", version=version)), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("reserved", [1 << bit for bit in range(16)])
def test_nonzero_reserved(reserved):
    assert_refused(whole(raw_frame(3, 0, 1, b"abc", reserved=reserved)), ErrorCode.BAD_FRAME)


def test_unknown_types():
    for ftype in [0, *range(MAX_FRAME_TYPE + 1, 256)]:
        assert_refused(whole(raw_frame(ftype, 0, 1, b"abc")), ErrorCode.UNKNOWN_TYPE)


@pytest.mark.parametrize("crc_delta", [1, 0x80000000, 0xFFFFFFFF])
def test_bad_checksum(crc_delta):
    good = struct.unpack("<I", HELLO_FRAME[20:24])[0]
    bad = raw_frame(3, 1, 42, b"hello", crc=good ^ crc_delta)
    assert_refused(whole(bad), ErrorCode.BAD_CHECKSUM)
    assert_refused(bytewise(bad), ErrorCode.BAD_CHECKSUM)


@each_codec
@pytest.mark.parametrize("announced", [101, 1 << 20, 0xFFFFFFFF])
def test_oversize_is_refused_from_the_header_alone(codec, announced):
    header = raw_frame(3, 0, 1, length=announced)
    assert len(header) == HEADER_SIZE
    dec = codec.FrameDecoder(100)
    assert dec.feed(header[:23]) == []
    with pytest.raises(ProtocolError) as err:
        dec.feed(header[23:])
    assert err.value.code == ErrorCode.TOO_LARGE
    assert "over the limit" in err.value.reason


@each_codec
def test_header_within_the_limit_waits_for_the_payload(codec):
    dec = codec.FrameDecoder(100)
    assert dec.feed(raw_frame(3, 0, 1, length=100)) == []
    assert dec.buffered == HEADER_SIZE


CHECK_ORDER = [
    pytest.param(dict(magic=b"XX", version=9, reserved=1, ftype=0, length=1 << 30), ErrorCode.BAD_FRAME, id="magic first"),
    pytest.param(dict(version=9, reserved=1, ftype=0, length=1 << 30), ErrorCode.BAD_FRAME, id="version before type"),
    pytest.param(dict(reserved=1, ftype=0, length=1 << 30), ErrorCode.BAD_FRAME, id="reserved before type"),
    pytest.param(dict(ftype=200, length=1 << 30), ErrorCode.UNKNOWN_TYPE, id="type before length"),
    pytest.param(dict(length=1 << 30, crc=0), ErrorCode.TOO_LARGE, id="length before crc"),
]


@pytest.mark.parametrize(("fields", "code"), CHECK_ORDER)
def test_check_order(fields, code):
    fields = dict(fields)
    frame = raw_frame(fields.pop("ftype", 3), 0, 1, b"abc", **fields)
    assert_refused(whole(frame), code)
    assert_refused(bytewise(frame), code)


@settings(max_examples=600, deadline=None)
@given(
    st.tuples(
        st.sampled_from([b"TQ", b"TQ", b"TQ", b"QT"]) | st.binary(min_size=2, max_size=2),
        st.sampled_from([1, 1, 1, 0, 2]) | st.integers(0, 255),
        st.integers(0, 12) | st.integers(0, 255),
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 0, 0, 1, 0x8000]) | st.integers(0, 0xFFFF),
        st.integers(0, U64_MAX),
        st.integers(0, 300) | st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
    ),
    st.sampled_from([0, 100, 200, DEFAULT_MAX_PAYLOAD]),
)
def test_any_header_meets_the_spec(fields, max_payload):
    header = HEADER.pack(*fields)
    verdict = spec_header_verdict(header, max_payload)
    expected = Outcome([], verdict, 0) if verdict else Outcome([], None, HEADER_SIZE)
    magic, version, ftype, flags, reserved, fid, length, crc = fields
    if verdict is None and length == 0:  # the header is the whole frame: the crc is checked too
        if crc == crc32c(header[:20]):
            expected = Outcome([(ftype, flags, fid, b"")], None, 0)
        else:
            expected = Outcome([], ErrorCode.BAD_CHECKSUM, 0)
    for codec in CODECS:
        assert run(codec, whole(header), max_payload) == expected
        assert run(codec, bytewise(header), max_payload) == expected


def flip_verdict(frames: list[Frame], stream: bytes, pos: int, mask: int, max_payload: int):
    """Spec outcome of XOR-ing stream[pos] with mask: (frames decoded first, error code or None)."""
    start = 0
    for k, f in enumerate(frames):
        size = HEADER_SIZE + len(f[3])
        if pos < start + size:
            break
        start += size
    off = pos - start
    if off in (0, 1, 2, 6, 7):  # magic, version, reserved
        return k, ErrorCode.BAD_FRAME
    if off == 3:
        return k, ErrorCode.BAD_CHECKSUM if 1 <= stream[pos] ^ mask <= MAX_FRAME_TYPE else ErrorCode.UNKNOWN_TYPE
    if 16 <= off < 20:
        length = len(frames[k][3]) ^ (mask << (8 * (off - 16)))
        if length > max_payload:
            return k, ErrorCode.TOO_LARGE
        if start + HEADER_SIZE + length > len(stream):
            return k, None  # waits for a payload that never comes
        # A shorter or longer frame whose CRC matches by chance (odds 2**-32) would break this.
    return k, ErrorCode.BAD_CHECKSUM  # flags, id, crc, payload, or a length that still fits


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames_st(max_payload=300, max_frames=5), st.data())
def test_single_byte_flip(frames, draw):
    assume(frames)
    max_payload = 512
    stream = encode_all(core, frames)
    k = draw.draw(st.integers(0, len(frames) - 1), label="frame")
    start = sum(HEADER_SIZE + len(f[3]) for f in frames[:k])
    size = HEADER_SIZE + len(frames[k][3])
    off = draw.draw(st.integers(0, HEADER_SIZE - 1) | st.integers(0, size - 1), label="offset")
    mask = draw.draw(st.integers(1, 255), label="xor mask")
    pos = start + off
    bad = bytearray(stream)
    bad[pos] ^= mask
    bad = bytes(bad)
    good, code = flip_verdict(frames, stream, pos, mask, max_payload)
    assert good == k
    for how, chunks in chunkings(draw, bad).items():
        outcomes = [run(codec, chunks, max_payload) for codec in CODECS]
        assert outcomes[0] == outcomes[1]
        got = outcomes[0]
        assert got.code == code
        if code is None:
            assert got == Outcome(frames[:k], None, len(stream) - start)
        else:
            # Frames completed by the chunk that held the error are dropped with it.
            assert got.frames == frames[: len(got.frames)] and len(got.frames) <= k
            if how == "bytewise":  # the error comes in a later feed than any good frame
                assert got.frames == frames[:k]


@settings(max_examples=400, deadline=None)
@given(frames_st(max_payload=300, max_frames=4), st.binary(min_size=1, max_size=64), st.data())
def test_garbage_prefix(frames, garbage, draw):
    stream = garbage + encode_all(core, frames)
    outcomes = {}
    for how, chunks in chunkings(draw, stream).items():
        results = [run(codec, chunks) for codec in CODECS]
        assert results[0] == results[1]
        outcomes[how] = results[0]
    codes = {o.code for o in outcomes.values()}
    assert len(codes) == 1, outcomes  # the verdict does not depend on the chunking
    if codes == {None}:
        assert len(set(map(repr, outcomes.values()))) == 1, outcomes
    if garbage[0] != ord("T") and len(stream) >= HEADER_SIZE:
        assert codes == {ErrorCode.BAD_FRAME}
        assert all(o.frames == [] for o in outcomes.values())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_random_bytes(data, draw):
    # Mostly refused at once; whatever happens, both agree and nothing but ProtocolError escapes.
    for prefix in (b"", b"TQ\x01"):
        stream = prefix + data
        for chunks in chunkings(draw, stream).values():
            assert run(core, chunks, 256) == run(twin, chunks, 256)


@each_codec
def test_poisoned_after_error(codec):
    dec = codec.FrameDecoder()
    pending = codec.encode_frame(4, 0, 9, b"p" * 100)
    assert dec.feed(HELLO_FRAME + pending[:30]) == [(3, 1, 42, b"hello")]
    assert dec.buffered == 30
    with pytest.raises(ProtocolError) as first:
        dec.feed(b"\x00" * 94)  # completes the pending frame with the wrong payload
    assert first.value.code == ErrorCode.BAD_CHECKSUM
    assert dec.buffered == 0
    for later in (b"", HELLO_FRAME, bytearray(b"TQ")):
        with pytest.raises(ProtocolError) as again:
            dec.feed(later)
        assert again.value is first.value
        assert dec.buffered == 0


@each_codec
def test_error_after_good_frames_of_the_same_feed(codec):
    # feed() returns frames or raises, never both: the good frame in front is not handed out.
    stream = HELLO_FRAME + b"XQ" + HELLO_FRAME[2:]
    assert run(codec, whole(stream)) == Outcome([], ErrorCode.BAD_FRAME, 0)
    assert run(codec, [stream[:29], stream[29:]]) == Outcome([(3, 1, 42, b"hello")], ErrorCode.BAD_FRAME, 0)


def test_protocol_error_carries_the_same_reason():
    frame = raw_frame(77, 0, 1)
    reasons = []
    for codec in CODECS:
        with pytest.raises(ProtocolError) as err:
            codec.FrameDecoder().feed(frame)
        reasons.append(err.value.reason)
        assert str(err.value) == err.value.reason
    assert reasons[0] == reasons[1] == "unknown frame type 77"


def test_worked_examples_in_the_spec():
    # docs/protocol.md shows these bytes; keep it in step with the codec.
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    for frame in (core.encode_frame(3, 1, 42, b"hello"), core.encode_frame(8, 0, 7)):
        assert frame.hex(" ") in doc
    assert "0x3CED4332" in doc and "0x58706AFE" in doc
    assert crc32c(HELLO_FRAME[:20]) == 0x58706AFE


@pytest.mark.parametrize("codec", [core, twin], ids=CODEC_IDS)
@pytest.mark.parametrize("data", [b"G", b"TX", b"TQ\x02", b"GET / HTTP/1.0\r\n\r\n"], ids=repr)
def test_partial_header_refused_from_its_first_bytes(codec, data):
    with pytest.raises(ProtocolError) as info:
        codec.FrameDecoder().feed(data)
    assert info.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("codec", [core, twin], ids=CODEC_IDS)
def test_partial_header_with_good_prefix_waits(codec):
    frame = codec.encode_frame(3, 0, 1, b"abc")
    dec = codec.FrameDecoder()
    for i in range(len(frame) - 1):
        assert dec.feed(frame[i:i + 1]) == []
    assert dec.feed(frame[-1:]) == [(3, 0, 1, b"abc")]
