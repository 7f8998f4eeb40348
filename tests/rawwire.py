"""Raw teomq frames on a blocking TCP socket: for tests that must speak the wire protocol
themselves (misbehave, ignore flow control, never answer) against a real CLI broker."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import msgpack

from procs import HANG_GUARD
from teomq._core.crc32c import crc32c
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq.protocol import DEFAULT_MAX_PAYLOAD, FrameType as T

Frame = tuple[int, int, int, bytes]


def raw_frame(ftype: int, flags: int, fid: int, payload: bytes = b"", *, length: int | None = None,
              crc: int | None = None) -> bytes:
    """A frame built field by field; the codec refuses to encode invalid ones (e.g. type 42)."""
    header = struct.pack("<2sBBHHQI", b"TQ", 1, ftype, flags, 0, fid, len(payload) if length is None else length)
    if crc is None:
        crc = crc32c(payload, crc32c(header))
    return header + struct.pack("<I", crc) + payload


def hello(role: str = "producer", name: str = "raw", **extra: Any) -> bytes:
    """A HELLO frame as a client of this release before capabilities sends it (no ``caps``)."""
    doc = {"v": 1, "role": role, "name": name, "prefetch": 0 if role == "producer" else 4,
           "nonce": os.urandom(16), "auth": None}
    doc.update(extra)
    return encode_frame(T.HELLO, 0, 0, msgpack.packb(doc))


class RawConn:
    """A blocking TCP socket to the broker with a frame decoder on the receiving side."""

    def __init__(self, port: int, timeout: float = HANG_GUARD) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.local = "127.0.0.1:%d" % self.sock.getsockname()[1]  # the broker's name for this peer
        self.decoder = FrameDecoder(DEFAULT_MAX_PAYLOAD)
        self.frames: list[Frame] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> None:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"no data and no EOF from the broker within {self.timeout:g} s") from None
        except ConnectionResetError as e:
            raise AssertionError(f"broker reset the connection instead of closing it: {e}") from None
        if not data:
            self.eof = True
        else:
            self.frames.extend(self.decoder.feed(data))

    def read_until_eof(self) -> list[Frame]:
        while not self.eof:
            self._recv()
        assert self.decoder.buffered == 0, "EOF in the middle of a frame"
        return self.frames

    def read_frame(self) -> Frame:
        """The next frame; fails on EOF."""
        while not self.frames:
            assert not self.eof, "broker closed the connection"
            self._recv()
        return self.frames.pop(0)

    def welcome(self) -> dict[str, Any]:
        """Read the WELCOME that answers our HELLO; its document."""
        ftype, _flags, _fid, payload = self.read_frame()
        assert ftype == T.WELCOME, f"expected WELCOME, got {T(ftype).name}: {payload[:200]!r}"
        doc = msgpack.unpackb(payload, raw=False)
        assert isinstance(doc, dict)
        return doc

    def close(self) -> None:
        self.sock.close()
