"""Type stub of the compiled teomq._core.teoproxy (teoproxy.pyx): the web gateway's packet codec.

Packet and the command numbers are those of the pure-Python twin ``teomq._py.teoproxy``.
"""

from _typeshed import ReadableBuffer

from teomq._py.teoproxy import (
    CONNECT as CONNECT,
    CONNECT_TO as CONNECT_TO,
    DISCONNECT as DISCONNECT,
    ERROR_BIT as ERROR_BIT,
    MIN_PACKET as MIN_PACKET,
    NEW_API_CLIENT as NEW_API_CLIENT,
    PUSH as PUSH,
    SEND_TO as SEND_TO,
    STREAM as STREAM,
    Packet as Packet,
)
from teomq.errors import BadPacket as BadPacket

__all__ = [
    "Packet", "CONNECT", "DISCONNECT", "CONNECT_TO", "NEW_API_CLIENT", "SEND_TO", "STREAM", "PUSH",
    "ERROR_BIT", "MIN_PACKET", "checksum", "pack", "unpack", "encode", "encode_error", "decode",
]

def checksum(data: ReadableBuffer) -> int:
    """Sum of the bytes of ``data``, mod 256."""

def pack(id: int, cmd: int, data: ReadableBuffer = b"") -> bytes:
    """The raw packet: id (u32 LE), cmd (0..255, error bit included), data, checksum."""

def encode(id: int, cmd: int, data: ReadableBuffer = b"") -> bytes:
    """A packet as the text of one WebSocket message (ASCII base64 bytes, no newline)."""

def encode_error(id: int, cmd: int, reason: str) -> bytes:
    """An error packet: ``cmd`` with bit 7 set, the reason as UTF-8 data; base64 text."""

def unpack(raw: ReadableBuffer, *, gateway: bool = True) -> Packet:
    """Check and split a raw packet (``gateway``: only commands 1..6 are accepted)."""

def decode(text: str | ReadableBuffer, *, gateway: bool = True) -> Packet:
    """Decode one WebSocket text message (str or ASCII bytes) into a checked packet."""
