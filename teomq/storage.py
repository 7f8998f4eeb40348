"""The broker's durable queues: the data directory's lock, the segment log, its syncer.

The log itself is the core's (``teomq._core.seglog.SegmentLog``, a Store): it records every
message of a queue route and what happens to it, gathers a loop pass's records into one batch
and writes it to the OS before any frame of that pass leaves the broker. This module is the
control plane around it (docs/storage.md):

- ``DiskStorage.open`` takes the data directory's lock (a second broker on it refuses to start)
  and reads the log back (``recover``);
- ``DiskStorage.attach`` gives the dispatcher the log and its recovered messages, and starts the
  syncer by the fsync policy: ``always`` (the default) syncs at the end of a pass that wrote while
  confirmations wait (else within ALWAYS_BACKSTOP_MS), in a thread
  in C (``Syncer``, syncer_impl.h: it never takes the GIL), one round at a time, each round covering everything
  written before it began (group commit); ``interval:MS`` syncs every MS milliseconds;
  ``never`` leaves it to the OS (the syncer then syncs only compaction's copies, before the
  segment they came from is deleted);
- with ``TEOMQ_TEST_SYNCED_RECORD=1`` in its environment the broker writes ``synced.json``, the
  bytes of each segment its syncs covered, after every round: ``power_cut`` cuts the files back
  to it, as a power failure would (tests only).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teomq._core.seglog import DEFAULT_SEGMENT_SIZE, SegmentLog, Syncer
from teomq.errors import StorageError

log = logging.getLogger("teomq.storage")

#: the queues' directory inside the data directory, its lock file, the test-only sync record
QUEUES_DIR = "queues"
LOCK_FILE = "LOCK"
SYNCED_RECORD = "synced.json"
#: the environment variable that makes a broker keep SYNCED_RECORD (power-cut tests)
SYNCED_RECORD_ENV = "TEOMQ_TEST_SYNCED_RECORD"

STORAGE_MODES = ("disk", "memory")
#: bounds of -segment-size (a record's offset in its segment is kept in 64 bits; the bound is
#: what one preallocation may cost)
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 1 << 30
#: disk storage: memory queued messages may hold before new ones are paged out (-memory-max)
DEFAULT_MEMORY_MAX = 64 << 20
MIN_MEMORY_MAX = 1 << 20
#: fsync always: records no confirmation waits for (requests, delivery states) are synced this
#: often (milliseconds); a pass with confirmations waiting starts a round at once
ALWAYS_BACKSTOP_MS = 100
#: a disk error (new messages refused) is retried this often (milliseconds), whatever the policy
RETRY_MS = 100
#: refused messages are logged at most this often (seconds)
REFUSAL_LOG_S = 1.0


@dataclass(frozen=True)
class FsyncPolicy:
    """When the log is made durable: ``always``, ``interval`` (every ``interval_ms``) or ``never``."""

    mode: str
    interval_ms: int = 0

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """``always``, ``never`` or ``interval:MS`` (MS a whole number of milliseconds, 1..3,600,000)."""
        if text in ("always", "never"):
            return cls(text)
        head, _, ms = text.partition(":")
        if head == "interval" and ms.isdigit() and 1 <= int(ms) <= 3_600_000:
            return cls("interval", int(ms))
        raise ValueError(f"fsync policy must be always, never or interval:MS (MS 1..3600000), not {text!r}")

    def __str__(self) -> str:
        return f"interval:{self.interval_ms}" if self.mode == "interval" else self.mode


class DiskStorage:
    """A broker's queues in ``data_dir/queues``: locked, recovered, synced by ``policy``."""

    def __init__(self, data_dir: str | os.PathLike[str], policy: FsyncPolicy | str = "always",
                 *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        self.dir = Path(data_dir) / QUEUES_DIR
        self.policy = policy if isinstance(policy, FsyncPolicy) else FsyncPolicy.parse(policy)
        self.segment_size = segment_size
        self.log: SegmentLog | None = None
        self.recovery: dict[str, Any] = {}
        self.restored = 0
        self.kept = 0
        self.paged_out = 0
        self.syncs = 0
        self.sync_errors = 0
        self.recovery_seconds = 0.0
        self._started = 0.0
        self.failed: OSError | None = None      # a sync failed: fail-stop
        self._write_failure_logged = False
        self._refusing_since: float | None = None   # loop time new messages began to be refused
        self._refusal_log_time = 0.0
        self._refused_at_start = self._refused_logged = 0
        self._lock_fd = -1
        self._dir_fd = -1
        self._syncer: Syncer | None = None
        self._round: tuple[int, list[tuple[int, int, int, bool]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: Any = None
        self._next_sync = 0.0          # loop time the policy's next sync round is due
        self._oldest = (0, 0)          # the oldest segment and its live count at the last tick
        self._read_errors_logged = 0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._record = os.environ.get(SYNCED_RECORD_ENV, "") not in ("", "0")

    # -- start and stop -------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """Lock the directory and read the log back. Raises StorageError when another broker
        holds the directory, LogFormatError (a StorageError) for a log it cannot read.

        SIGXFSZ is ignored from here on (when called in the main thread): a file size limit
        (RLIMIT_FSIZE) makes a write fail with EFBIG, a disk error the broker rides out, instead
        of killing the process."""
        with contextlib.suppress(ValueError):     # not the main thread: the embedder's choice
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot use the data directory {self.dir.parent}: {e.strerror}", e.errno or 0) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StorageError(f"the data directory {self.dir.parent} is in use by another broker "
                               f"(pid {holder}); give each broker its own -data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.log = SegmentLog(self.dir, segment_size=self.segment_size,
                              confirm_on_write=self.policy.mode != "always")
        self._started = time.perf_counter()
        try:
            self.recovery = self.log.recover()
        except BaseException:
            self.close_files()
            raise
        return self.recovery

    def attach(self, dispatcher: Any, loop: asyncio.AbstractEventLoop) -> None:
        """The dispatcher keeps its queues in the log: recovered messages restored, syncer started."""
        lg = self._log()
        dispatcher.set_store(lg)
        self._dispatcher = dispatcher
        self.restored, self.kept = dispatcher.restore()
        self.paged_out = dispatcher.n_paged_out + dispatcher.n_delayed_out
        lg.finish_recovery()
        self.recovery_seconds = time.perf_counter() - self._started
        self._report_recovery()
        if self._record:
            self._write_record()
        self._loop = loop
        # every policy has the syncer: never uses it only for compaction's copies
        self._syncer = Syncer(self._dir_fd)
        loop.add_reader(self._syncer.fd, self._round_ended)
        self._next_sync = loop.time() + self._period()
        self._timer = loop.call_later(RETRY_MS / 1000, self._tick)
        if self.policy.mode == "always":
            lg.on_written = self._written
            lg.notify_written = True

    def _period(self) -> float:
        # seconds between sync rounds: interval's; always: the backstop for records no
        # confirmation waits for (requests, state records); never: none but compaction's
        return self.policy.interval_ms / 1000 if self.policy.mode == "interval" else ALWAYS_BACKSTOP_MS / 1000

    def close(self) -> None:
        """Write what is gathered, sync it (whatever the policy: a clean stop keeps everything),
        stop the syncer, close the files and release the lock."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._syncer is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._syncer.fd)
            self._syncer.stop()
            self._syncer = None
        if self.log is not None:
            lg = self.log
            lg.on_written = None
            try:
                lg.close()
            except OSError as e:
                log.error("storage: closing the log failed: %s (what it did not write is lost)", e)
            st = lg.stats()
            log.info("storage: closed: %d records in %d batches, %d syncs; %d messages stay queued on disk",
                     st["records"], st["batches"], self.syncs, st["live"])
            if self._record:
                self._write_record()
        self.close_files()

    def sync_now(self) -> None:
        """fdatasync what the log has written, here on the loop (blocking: for rare operations
        that must be durable before they go on, such as a dead letter's replay). Nothing under
        ``-fsync never``. OSError: the sync failed (fail-stop, as a round's)."""
        lg = self._log()
        if self.policy.mode == "never" or self.failed is not None:
            return
        batches, targets = lg.sync_targets()
        try:
            for fd, *_ in targets:
                os.fdatasync(fd)
            if any(not t[3] for t in targets) and self._dir_fd >= 0:
                os.fsync(self._dir_fd)
        except OSError as e:
            busy = self._busy
            self._synced(batches, targets, e)     # fail-stop, logged
            self._busy = busy                     # (a round of the syncer's may still run)
            raise
        finally:
            for fd, *_ in targets:
                os.close(fd)
        lg.mark_synced(targets, batches)
        self.syncs += 1
        if self._record:
            self._write_record()

    def close_files(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._lock_fd = -1

    # -- syncing --------------------------------------------------------------------------

    def _log(self) -> SegmentLog:
        if self.log is None:
            raise RuntimeError("storage is not open")
        return self.log

    def _written(self) -> None:
        # always: a pass wrote records while confirmations wait, and the syncer is idle. Called
        # from inside the pass's flush: an error here must not cost the pass its output
        try:
            self._start_round()
        except Exception:
            log.exception("storage: starting a sync round failed (the next tick tries again)")

    def _tick(self) -> None:
        # every RETRY_MS whatever the policy: write retries, disk errors, read errors,
        # compaction, and the policy's sync rounds when due; never stops on an error
        loop = asyncio.get_running_loop()
        try:
            self._housekeeping(loop.time())
        except Exception:
            log.exception("storage: housekeeping failed (tried again in %d ms)", RETRY_MS)
        finally:
            if self.log is not None and not loop.is_closed():
                self._timer = loop.call_later(RETRY_MS / 1000, self._tick)

    def _housekeeping(self, now: float) -> None:
        lg = self._log()
        if lg.error:
            if lg.retry_write():
                log.warning("storage: the log is written again after a failed write")
            elif not self._write_failure_logged:
                self._write_failure_logged = True
                log.error("storage: writing the log failed: %s (retried; confirmations wait)", lg.error_text)
        if not lg.error:
            self._write_failure_logged = False
        if lg.refusing:
            self._check_refusing(lg, now)
        if lg.n_read_errors != self._read_errors_logged:
            log.error("storage: %d reads of paged-out messages failed: %s (their queue waits; tried again)",
                      lg.n_read_errors - self._read_errors_logged, lg.read_error_text)
            self._read_errors_logged = lg.n_read_errors
        if self._dispatcher is not None and not lg.refusing:
            self._compact()
        due = lg.drop_pending or (self.policy.mode != "never" and now >= self._next_sync)
        if due and not self._busy and self._syncer is not None:
            self._start_round()
            self._next_sync = now + self._period()

    def _compact(self) -> None:
        # the oldest segment pinned by a few live messages: copy them forward (Dispatcher.compact);
        # not while consumers are taking its messages (its live count fell since the last tick):
        # a queue drained in order empties it by itself, and copies would be written for nothing
        oldest, self._oldest = self._oldest, self._log().oldest
        if oldest[0] == self._oldest[0] and self._oldest[1] < oldest[1]:
            return
        try:
            copied, left = self._dispatcher.compact()
        except OSError as e:
            log.warning("storage: compaction stopped: %s (tried again later)", e)
            return
        if left:
            log.warning("storage: the oldest segment keeps %d live messages that are not in this broker's queues "
                        "(kept for commands it does not have): it cannot be compacted", left)
        elif copied:
            log.debug("storage: compaction copied %d live messages forward out of the oldest segment", copied)

    def _check_refusing(self, lg: SegmentLog, now: float) -> None:
        # new messages are refused (STORAGE errors): log it, try to resume, log what was refused
        if self._refusing_since is None:
            self._refusing_since = self._refusal_log_time = now
            self._refused_at_start = self._refused_logged = lg.n_refused
            log.error("storage: new messages are refused: %s; deliveries and answers go on, %s",
                      lg.refusing_text, "restart the broker once the disk is sound (a sync failed)" if lg.stopped
                      else f"and the broker tries again every {RETRY_MS} ms")
        if not lg.stopped and lg.resume():
            log.warning("storage: new messages are accepted again after %.1f s (%d refused meanwhile)",
                        now - self._refusing_since, lg.n_refused - self._refused_at_start)
            self._refusing_since = None
            return
        if lg.n_refused != self._refused_logged and now - self._refusal_log_time >= REFUSAL_LOG_S:
            log.warning("storage: %d messages refused in the last %.1f s: %s", lg.n_refused - self._refused_logged,
                        now - self._refusal_log_time, lg.refusing_text)
            self._refused_logged = lg.n_refused
            self._refusal_log_time = now

    def _start_round(self) -> None:
        lg = self._log()
        if self.failed is not None:
            lg.notify_written = False
            return
        batches, targets = lg.sync_targets()
        if not targets or self._syncer is None:
            for fd, *_ in targets:
                os.close(fd)
            if self._syncer is not None:
                lg.mark_synced([], batches)     # everything written is synced already
            lg.notify_written = self.policy.mode == "always"
            return
        try:
            self._syncer.submit(targets, any(not t[3] for t in targets))
        except BaseException:
            for fd, *_ in targets:
                os.close(fd)
            lg.notify_written = self.policy.mode == "always"
            raise
        self._busy = True
        lg.notify_written = False
        self._round = (batches, targets)

    def _round_ended(self) -> None:
        # on the loop: the syncer's eventfd fired
        if self._syncer is None or self._round is None:
            return
        err = self._syncer.result()
        (batches, targets), self._round = self._round, None
        self._synced(batches, targets, OSError(err, os.strerror(err)) if err else None)

    def _synced(self, batches: int, targets: list[tuple[int, int, int, bool]], error: OSError | None) -> None:
        # a round ended
        self._busy = False
        lg = self.log
        if lg is None:
            return
        if error is not None:
            # Fail-stop: after a failed fdatasync the kernel may have dropped the dirty pages and
            # a retry would "succeed" on data that never reached the disk: nothing more is
            # confirmed as synced by this broker (its confirmations wait; restart it).
            self.sync_errors += 1
            self.failed = error
            lg.notify_written = False
            lg.stop_accepting(error.errno or 5, "fdatasync failed")
            log.critical("storage: fdatasync failed: %s; no message is confirmed from now on: what it covered "
                         "may not be on disk (restart the broker once the disk is sound)", error)
            return
        else:
            self.syncs += 1
            lg.mark_synced(targets, batches)
            if self._record:
                self._write_record()      # (before a deletion: the record says what was synced)
            if lg.drop_pending:
                lg.drop_done()            # compaction's emptied segment, with no pass to do it
        if self.policy.mode == "always":
            if lg.waiting:
                self._start_round()      # what arrived during the round
            else:
                lg.notify_written = True  # idle until a pass writes while confirmations wait

    def _write_record(self) -> None:
        lg = self._log()
        tmp = self.dir / (SYNCED_RECORD + ".tmp")
        tmp.write_text(json.dumps(lg.synced_offsets()))
        os.replace(tmp, self.dir / SYNCED_RECORD)

    # -- reports --------------------------------------------------------------------------

    def _report_recovery(self) -> None:
        r = self.recovery
        for name, off, n in r.get("cut", []):
            log.warning("storage: %s: torn tail cut at offset %d (%d bytes)", name, off, n)
        for name, off, n in r.get("skipped", []):
            if off == 0:
                log.warning("storage: %s: its header is damaged (CRC); its batches were read", name)
            else:
                log.warning("storage: %s: a damaged batch at offset %d skipped (%d bytes, CRC failed)", name, off, n)
        if self.kept:
            log.warning("storage: %d recovered messages are for commands this broker does not have; "
                        "kept on disk, not delivered", self.kept)
        data = r.get("data", 0)
        secs = self.recovery_seconds
        log.info("storage: %s, fsync %s: %d segments (%d bytes of log), %d batches read, %d messages restored%s%s "
                 "in %.3f s (%.0f MB/s)", self.dir, self.policy, r.get("segments", 0), data, r.get("batches", 0),
                 self.restored, f" ({self.paged_out} of them paged out: the memory budget)" if self.paged_out else "",
                 f", {r['bad_batches']} damaged batches skipped" if r.get("bad_batches") else "",
                 secs, data / secs / 1e6 if secs > 0 else 0.0)

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self._log().stats()) if self.log is not None else {}
        s.update(syncs=self.syncs, sync_errors=self.sync_errors, fsync=str(self.policy))
        return s


def power_cut(data_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Cut a stopped broker's segments back to what its syncs covered (its ``synced.json``,
    kept with TEOMQ_TEST_SYNCED_RECORD=1), as a power failure would; a segment no sync covered
    is removed. Returns {file: bytes cut}. For tests."""
    qdir = Path(data_dir) / QUEUES_DIR
    synced: dict[str, int] = json.loads((qdir / SYNCED_RECORD).read_text())
    cut: dict[str, int] = {}
    for path in sorted(qdir.glob("*.seg")):
        keep = synced.get(path.name, 0)
        data = path.read_bytes()
        end = len(data.rstrip(b"\0"))
        if keep <= 0:
            cut[path.name] = end
            path.unlink()
        elif end > keep:
            cut[path.name] = end - keep
            with open(path, "r+b") as f:
                f.seek(keep)
                f.write(b"\0" * (end - keep))
    return cut
