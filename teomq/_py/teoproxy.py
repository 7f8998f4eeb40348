"""The teoproxy packet codec in pure Python: the oracle of :mod:`teomq._core.teoproxy`.

The WebSocket gateway (``/ws``) speaks the original teoproxy protocol. Every WebSocket
message is a **text** frame holding standard base64 (with ``=`` padding) of one packet::

    offset  size   field
    0       4      id        u32 little-endian; 0 in Stream pushes
    4       1      cmd       bits 0..6 the command, bit 7 set: an error, data is its reason (UTF-8)
    5       n      data      bytes
    5+n     1      checksum  sum of bytes 0 .. 4+n, mod 256

Commands (client -> gateway unless noted): 0 Stream push (gateway -> client only),
1 Connect, 2 Disconnect, 3 ConnectTo, 4 NewApiClient, 5 SendTo, 6 Stream.

Checks on receipt, in this order (the first failure wins; the original's order):

    1. the text is standard base64                 "bad base64: ..."
    2. at least 6 bytes                            "not enough data: N bytes, a packet has at least 6"
    3. checksum                                    "wrong checksum: 0xXX in the packet, 0xYY computed"
    4. (gateway side) command 1..6                 "unknown command N"

Public API and behaviour are those of the Cython module, error for error;
tests/test_teoproxy_codec.py holds the two against each other.
"""

from __future__ import annotations

import binascii
from typing import NamedTuple

from teomq.errors import BadPacket

__all__ = [
    "Packet", "CONNECT", "DISCONNECT", "CONNECT_TO", "NEW_API_CLIENT", "SEND_TO", "STREAM", "PUSH",
    "ERROR_BIT", "MIN_PACKET", "checksum", "pack", "unpack", "encode", "encode_error", "decode",
]

PUSH = 0  # gateway -> client: a Stream push (id 0)
CONNECT = 1
DISCONNECT = 2
CONNECT_TO = 3
NEW_API_CLIENT = 4
SEND_TO = 5
STREAM = 6
ERROR_BIT = 0x80
MIN_PACKET = 6  # id, cmd, checksum


class Packet(NamedTuple):
    id: int
    cmd: int  # without the error bit
    data: bytes  # for an error packet: its reason, UTF-8
    error: bool


def _view(obj: object) -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    return memoryview(obj).tobytes()  # type: ignore[arg-type]


def checksum(data: object) -> int:
    """Sum of the bytes of ``data``, mod 256."""
    return sum(_view(data)) & 0xFF


def pack(id: int, cmd: int, data: object = b"") -> bytes:
    """The raw packet: id (u32 LE), cmd (0..255, error bit included), data, checksum."""
    if not 0 <= id <= 0xFFFFFFFF:
        raise OverflowError("packet id must be 0 .. 2**32 - 1")
    if not 0 <= cmd <= 0xFF:
        raise OverflowError("packet cmd must be 0 .. 255")
    body = id.to_bytes(4, "little") + bytes((cmd,)) + _view(data)
    return body + bytes((sum(body) & 0xFF,))


def encode(id: int, cmd: int, data: object = b"") -> bytes:
    """A packet as the text of one WebSocket message (ASCII base64 bytes, no newline)."""
    return binascii.b2a_base64(pack(id, cmd, data), newline=False)


def encode_error(id: int, cmd: int, reason: str) -> bytes:
    """An error packet: ``cmd`` with bit 7 set, the reason as UTF-8 data; base64 text."""
    return encode(id, (cmd & 0x7F) | ERROR_BIT, reason.encode("utf-8", "replace"))


def unpack(raw: object, *, gateway: bool = True) -> Packet:
    """Check and split a raw packet. ``gateway``: only commands 1..6 are accepted (what a
    client may send); otherwise any command, 0 (push) included (what a client receives)."""
    raw = _view(raw)
    n = len(raw)
    if n < MIN_PACKET:
        raise BadPacket(f"not enough data: {n} bytes, a packet has at least {MIN_PACKET}")
    pid = int.from_bytes(raw[:4], "little")
    cmd_byte = raw[4]
    want = sum(raw[:-1]) & 0xFF
    if raw[-1] != want:
        raise BadPacket(f"wrong checksum: 0x{raw[-1]:02x} in the packet, 0x{want:02x} computed", pid, cmd_byte)
    cmd = cmd_byte & 0x7F
    if gateway and not 1 <= cmd <= 6:
        raise BadPacket(f"unknown command {cmd}", pid, cmd_byte)
    return Packet(pid, cmd, raw[5:-1], bool(cmd_byte & ERROR_BIT))


def decode(text: object, *, gateway: bool = True) -> Packet:
    """Decode one WebSocket text message (str or ASCII bytes) into a checked packet."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise BadPacket("bad base64: the text is not ASCII") from None
    try:
        raw = binascii.a2b_base64(_view(text), strict_mode=True)
    except binascii.Error as e:
        raise BadPacket(f"bad base64: {e}") from None
    return unpack(raw, gateway=gateway)
