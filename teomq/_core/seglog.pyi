"""Type stub of the compiled teomq._core.seglog (seglog.pyx): the durable store, an append-only
log of segment files (docs/storage.md), and its recovery."""

import os
from collections.abc import Callable, Sequence
from typing import Any, final

from teomq._core.endpoint import Outbox
from teomq._core.store import Store
from teomq.errors import LogFormatError as LogFormatError

#: the log's format version (segment and batch headers)
FORMAT_VERSION: int
SEGMENT_HEADER_SIZE: int
BATCH_HEADER_SIZE: int
MESSAGE_RECORD_SIZE: int
STATE_RECORD_SIZE: int
#: default size a segment file is rolled at (it is preallocated 1 MiB at a time)
DEFAULT_SEGMENT_SIZE: int

def segment_name(no: int) -> str:
    """The file name of segment ``no``."""

def segment_numbers(path: str | os.PathLike[str]) -> list[int]:
    """The numbers of the segment files in ``path``, in order."""


@final
class SegmentLog(Store):
    """Queues in segment files: records gathered per loop pass, one write each, recovered at start."""

    notify_written: bool
    on_written: Callable[[], None] | None
    def __init__(self, path: str | os.PathLike[str], *, segment_size: int = ..., epoch: int = 0,
                 confirm_on_write: bool = False) -> None: ...
    @property
    def confirm_on_write(self) -> bool:
        """Confirmations go out once a batch is written to the OS (fsync interval/never)."""
    @property
    def synced_batches(self) -> int:
        """Batches a finished sync round covered."""
    @property
    def waiting(self) -> int:
        """Endpoints whose confirmations wait for a batch to be stored."""
    @property
    def path(self) -> str: ...
    @property
    def segment_size(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def n_batches(self) -> int: ...
    @property
    def n_records(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def n_deleted(self) -> int: ...
    @property
    def error(self) -> int:
        """errno of the last failed write (0: none)."""
    @property
    def error_text(self) -> str | None: ...
    @property
    def refusing(self) -> int:
        """errno of the disk error new messages are refused for (STORAGE errors); 0: accepting."""
    @property
    def refusing_text(self) -> str | None: ...
    @property
    def stopped(self) -> bool:
        """Refusing for good (a failed fdatasync)."""
    @property
    def n_refused(self) -> int:
        """Messages refused for a disk error."""
    @property
    def refusal_payload(self) -> bytes | None:
        """The ERROR payload a refused SEND gets (None when accepting)."""
    @property
    def n_read_errors(self) -> int:
        """Reads of paged-out messages that failed."""
    @property
    def read_error_text(self) -> str | None: ...
    @property
    def n_reads(self) -> int: ...
    @property
    def n_moved(self) -> int:
        """Live messages copied forward by compaction."""
    @property
    def n_compactions(self) -> int: ...
    def compact_due(self) -> bool:
        """Choose the segment to empty, if one is worth it (Dispatcher.compact then copies)."""
    def compact_end(self) -> int:
        """After Dispatcher.compact: the live messages left in that segment."""
    def drop_done(self) -> None:
        """Delete the oldest segments that hold nothing live."""
    @property
    def oldest(self) -> tuple[int, int]:
        """(number, live messages) of the oldest segment; (0, 0) when there is none."""
    def compact_abort(self) -> None:
        """Dispatcher.compact stopped on an error: tried again at a later round."""
    @property
    def drop_pending(self) -> bool:
        """Compaction's copies wait for a sync before segments may be deleted."""
    def resume(self) -> bool:
        """While refusing: write what waits, start a due segment, make room; True once accepting."""
    def stop_accepting(self, err: int, what: str) -> None:
        """Refuse new messages for good."""
    @property
    def recovery(self) -> dict[str, Any]: ...
    @property
    def segments(self) -> list[tuple[str, int, int]]:
        """[(file name, bytes written, live messages)], oldest first."""
    def attach(self, routes: list[Any], outbox: Outbox) -> None:
        """The dispatcher's routes and Outbox (whose flush writes each pass's batch)."""
    def retry_write(self) -> bool:
        """Write a batch whose write failed; True once nothing is left unwritten."""
    def sync_targets(self) -> tuple[int, list[tuple[int, int, int, bool]]]:
        """(batches written, [(dup'd fd, end, segment number, directory entry synced)] of the
        segments not yet synced): the syncer's next round."""
    def mark_synced(self, targets: Sequence[tuple[int, int, int, bool]], batches: int) -> None:
        """The round over ``targets`` finished: those bytes are durable, those batches' confirmations go."""
    def synced_offsets(self) -> dict[str, int]:
        """{segment file name: bytes synced}."""
    def close(self) -> None:
        """Write what the pass gathered, sync every open segment and close it."""
    def stats(self) -> dict[str, int]: ...
    def recover(self) -> dict[str, Any]:
        """Read every segment of the directory, oldest first; what was found."""
    def finish_recovery(self) -> None:
        """After restore: unmap, delete what holds nothing live, begin a new active segment."""

@final
class Syncer:
    """The fdatasync thread (C, never takes the GIL): submit a round, watch ``fd``, read ``result``."""

    def __init__(self, dirfd: int) -> None: ...
    @property
    def fd(self) -> int:
        """An eventfd: readable when a round ended."""
    def submit(self, targets: Sequence[tuple[int, int, int, bool]], directory: bool) -> None:
        """A round: fdatasync every target's fd (then close it), and the directory if asked."""
    def result(self) -> int:
        """After ``fd`` became readable: 0, or the round's errno."""
    def stop(self) -> None:
        """Let a submitted round finish, then end the thread."""
