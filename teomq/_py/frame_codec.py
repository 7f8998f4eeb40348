"""Frame codec of the teomq wire protocol in pure Python: the oracle of :mod:`teomq._core.frame_codec`.

Wire schema (little-endian; docs/protocol.md is the full spec)::

    0   2  magic     b"TQ"
    2   1  version   1
    3   1  type      1..9 (HELLO WELCOME SEND DELIVER ANSWER REPLY ERROR PING PONG)
    4   2  flags     NO_REPLY=1 (SEND), NO_ANSWER=2 (ANSWER), REDELIVERED=4 (DELIVER), API=8 (SEND)
    6   2  reserved  must be 0
    8   8  id        message id / delivery id
    16  4  length    payload bytes; over the receiver's limit -> TOO_LARGE, refused from the header
    20  4  crc       CRC32C of bytes 0..19 then the payload
    24  *  payload

Checks run in this order, the first failure wins: magic, version, reserved, type,
length (all from the header alone, before any payload is buffered), then crc. Magic and
version are checked as soon as their bytes arrive, before the rest of the header.

Public API and behaviour are those of the Cython module, error for error; tests/test_frame_codec.py
holds the two against each other.
"""

from __future__ import annotations

import operator
import struct
from typing import SupportsIndex

from teomq.errors import ProtocolError
from teomq.protocol import HEADER_SIZE, MAGIC, MAX_FRAME_TYPE, VERSION, ErrorCode
from teomq._py.crc32c import byte_view, crc32c

__all__ = ["encode_frame", "WriteBuffer", "FrameDecoder"]

# Header bytes 0..19, the part the crc covers: magic, version, type, flags, reserved, id, length.
_HEAD = struct.Struct("<2sBBHHQI")
_CRC = struct.Struct("<I")
_INT_MIN = -(1 << 31)
_INT_MAX = (1 << 31) - 1
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1


def _c_int(value: SupportsIndex) -> int:
    value = operator.index(value)
    if not _INT_MIN <= value <= _INT_MAX:
        raise OverflowError("value too large to convert to int")
    return value


def _c_unsigned(value: SupportsIndex, limit: int, ctype: str) -> int:
    value = operator.index(value)
    if value < 0:
        raise OverflowError(f"can't convert negative value to {ctype}")
    if value > limit:
        raise OverflowError(f"value too large to convert to {ctype}")
    return value


def _encode(ftype: SupportsIndex, flags: SupportsIndex, fid: SupportsIndex, payload: object) -> bytes:
    """Validate like the core's ``WriteBuffer.add`` and return the encoded frame."""
    ftype = operator.index(ftype)
    flags = operator.index(flags)
    fid = _c_unsigned(fid, _U64_MAX, "unsigned PY_LONG_LONG")
    if not 0 < ftype <= MAX_FRAME_TYPE:
        raise ValueError(f"unknown frame type {ftype}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError("flags out of range")
    view = byte_view(payload)
    n = len(view)
    if n > _U32_MAX:
        raise ValueError("payload too long")
    head = _HEAD.pack(MAGIC, VERSION, ftype, flags, 0, fid, n)
    return head + _CRC.pack(crc32c(view, crc32c(head))) + view.tobytes()


def _check_partial(buf: bytearray, pos: int, end: int) -> None:
    """Refuse a partial header early when its first bytes already show it is not a frame."""
    n = end - pos
    if n >= 1 and buf[pos] != MAGIC[0] or n >= 2 and buf[pos + 1] != MAGIC[1]:
        raise ProtocolError(ErrorCode.BAD_FRAME, "bad magic: not a teomq frame")
    if n >= 3 and buf[pos + 2] != VERSION:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unsupported protocol version {buf[pos + 2]}")


class WriteBuffer:
    """Reusable output buffer: frames are encoded onto it; take() hands the bytes out."""

    __slots__ = ("_buf",)

    def __init__(self, initial: int = 4096) -> None:
        _c_unsigned(initial, _U64_MAX, "size_t")  # only a size hint, checked as the core checks it
        self._buf = bytearray()

    def add(self, ftype: int, flags: int, fid: int, payload: object = b"") -> None:
        """Encode one frame onto the buffer."""
        self._buf += _encode(ftype, flags, fid, payload)

    def take(self) -> bytes:
        """Return everything encoded so far and empty the buffer."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def __len__(self) -> int:
        return len(self._buf)


def encode_frame(ftype: int, flags: int, fid: int, payload: object = b"") -> bytes:
    """Encode one frame to bytes."""
    operator.index(ftype)
    operator.index(flags)
    _c_unsigned(fid, _U64_MAX, "unsigned PY_LONG_LONG")
    len(payload)  # type: ignore[arg-type]  # the core sizes its buffer first: TypeError without len()
    return _encode(ftype, flags, fid, payload)


def _parse_header(buf: bytearray, pos: int, max_payload: int) -> tuple[int, int, int, int]:
    """Validate the 24 header bytes at ``buf[pos:]``; return (type, flags, id, length)."""
    magic, version, ftype, flags, reserved, fid, length = _HEAD.unpack_from(buf, pos)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, "bad magic: not a teomq frame")
    if version != VERSION:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unsupported protocol version {version}")
    if reserved != 0:
        raise ProtocolError(ErrorCode.BAD_FRAME, "reserved header field is not zero")
    if ftype == 0 or ftype > MAX_FRAME_TYPE:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {ftype}")
    if length > max_payload:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"frame payload of {length} bytes is over the limit of {max_payload}"
        )
    return ftype, flags, fid, length


class FrameDecoder:
    """Incremental decoder: feed() any chunking of a byte stream, get back every complete frame.

    Frames come back as tuples ``(type, flags, id, payload: bytes)``. After a ProtocolError
    the decoder is poisoned: every later feed() raises the same error.
    """

    __slots__ = ("_buf", "_max_payload", "_error")

    def __init__(self, max_payload: int = 1 << 20) -> None:
        self._max_payload = _c_unsigned(max_payload, _U32_MAX, "uint32_t")
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def max_payload(self) -> int:
        """Largest payload accepted; a header announcing more is refused with TOO_LARGE."""
        return self._max_payload

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return len(self._buf)

    def feed(self, data: object) -> list[tuple[int, int, int, bytes]]:
        """Add bytes; return the list of frames completed by them (may be empty)."""
        view = byte_view(data)
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += view
        out: list[tuple[int, int, int, bytes]] = []
        pos = 0
        end = len(buf)
        try:
            # The view is released before buf is resized below (a bytearray with exports cannot be).
            with memoryview(buf) as mv:
                while end - pos >= HEADER_SIZE:
                    ftype, flags, fid, length = _parse_header(buf, pos, self._max_payload)
                    total = HEADER_SIZE + length
                    if end - pos < total:
                        break
                    body = pos + HEADER_SIZE
                    crc = crc32c(mv[body : body + length], crc32c(mv[pos : pos + 20]))
                    if crc != _CRC.unpack_from(buf, pos + 20)[0]:
                        raise ProtocolError(ErrorCode.BAD_CHECKSUM, "frame checksum mismatch")
                    out.append((ftype, flags, fid, mv[body : body + length].tobytes()))
                    pos += total
                if end - pos < HEADER_SIZE:
                    _check_partial(buf, pos, end)
        except ProtocolError as exc:
            self._error = exc
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return out
