"""Type stub of the compiled teomq._core.frame_codec (frame_codec.pyx): the wire protocol's frames.

Frame fields (type, flags, id) are ints or objects with ``__index__``; payloads are any
C-contiguous buffer. ``teomq._py.frame_codec`` is the pure-Python twin.
"""

from typing import SupportsIndex, final

from _typeshed import ReadableBuffer

from teomq.errors import ProtocolError as ProtocolError

@final
class WriteBuffer:
    """Reusable output buffer: frames are encoded straight into it; take() hands the bytes out."""

    def __init__(self, initial: int = 4096) -> None: ...
    def add(self, ftype: SupportsIndex, flags: SupportsIndex, fid: SupportsIndex,
            payload: ReadableBuffer = b"") -> None:
        """Encode one frame onto the buffer."""
    def take(self) -> bytes:
        """Return everything encoded so far and empty the buffer."""
    def __len__(self) -> int: ...

def encode_frame(ftype: SupportsIndex, flags: SupportsIndex, fid: SupportsIndex,
                 payload: ReadableBuffer = b"") -> bytes:
    """Encode one frame to bytes."""


class FrameDecoder:
    """Incremental decoder: feed() any chunking of a byte stream, get back every complete frame.

    Frames come back as tuples ``(type, flags, id, payload)``. After a ProtocolError the
    decoder is poisoned: every later feed() raises the same error.
    """

    def __init__(self, max_payload: SupportsIndex = 1048576) -> None: ...
    @property
    def max_payload(self) -> int: ...
    def set_max_payload(self, max_payload: SupportsIndex) -> None:
        """Hold frames not yet parsed to a new payload limit (e.g. the peer's, once known)."""
    def feed(self, data: ReadableBuffer) -> list[tuple[int, int, int, bytes]]:
        """Add bytes; return the list of frames completed by them (may be empty)."""
    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
