"""Type stub of the compiled teomq._core.msglog (msglog.pyx): the broker's per-message log
line, formatted in C into a buffer and written once per loop pass, outside Python logging."""

import os
from typing import final

#: payload bytes a text payload's line shows
SHOWN: int
#: payload bytes a binary payload's line shows, in hex
HEX_SHOWN: int

@final
class MessageLog:
    """Per-message log lines to a file descriptor (or a file, appended), once per loop pass."""

    def __init__(self, target: int | str | os.PathLike[str], limit: int = 8388608) -> None: ...
    @property
    def fd(self) -> int: ...
    @property
    def lines(self) -> int:
        """Lines formatted so far."""
    @property
    def dropped(self) -> int:
        """Lines not written: the buffer was at its limit, or a write failed."""
    @property
    def last_errno(self) -> int:
        """errno of the last failed write (0: none)."""
    @property
    def pending(self) -> int:
        """Bytes of lines not yet written."""
    def write(self, name: bytes | None, msg_id: int, payload: bytes) -> None:
        """Add the line for one message (as the core does for each accepted one)."""
    def flush(self) -> None:
        """Write every buffered line now (as the loop pass's flush does)."""
    def close(self) -> None:
        """Write what is buffered, then close the file if this log opened it."""
