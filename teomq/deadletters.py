"""The broker's dead-letter queue: the messages it gave up on, kept for an operator to read,
replay or purge.

A message is dead-lettered when a consumer rejects it (``rejected``), when it was delivered too
often (``max_deliveries``) or when too many consumers ended while holding it (``max_crashes``).
That is rare, so this store is plain Python and is written for crash safety, not speed: each
``add()`` or ``remove()`` is one ``write()`` of all its records, then ``fdatasync`` (unless
``sync`` is off, as with ``-fsync never``), before it returns. ``path=None`` keeps everything in
memory (``-storage memory``).

File format (``<data>/dlq/deadletters.log``), all integers little-endian::

    header    8 bytes   b"TQDLQ\\x00\\x01\\n": magic "TQDLQ", a zero byte, format version 1, "\\n"
    records   one after another to the end of the file, each:
      length  u32       bytes in body
      crc     u32       CRC32C of the 4 length bytes followed by body,
                        i.e. crc32c(body, crc32c(length_bytes)); a record's bytes are never rewritten
      body    length    one msgpack map (str keys, payload as bin):
                          {"op": "add", "dl": DeadLetter.to_doc()}  a dead letter, with its id
                          {"op": "del", "id": n}     dead letter n is gone (replayed, purged, evicted)
                          {"op": "next", "id": n}    ids below n are taken (a compacted file's first
                                                     record, when its highest live id is below n - 1)

Reading (``open``) replays the records in order. It stops at the first record that is short,
fails its CRC or does not decode, and cuts the file there (``recovery_note`` says where and why):
a torn tail is what a crash in the middle of a write leaves. A damaged record with more bytes
after it loses those too; any cut other than a short tail is first copied to
``<path>.damaged-<offset>-<time>`` so that nothing is destroyed. A write that fails is cut back
at once (or, if that fails too, before the next write), so later records never sit behind
garbage.

A crash during ``add()`` may leave the first records of its batch in the file: after a crash a
message may then be both in the dead-letter queue and in its own queue, but never in neither.
Ids increase and are kept across reopen, deleted ones included; only the ids of letters lost to
a damaged tail may be given again.

The file is compacted when it holds more than ``2 * live + COMPACT_SLACK`` records:
``<path>.tmp`` gets the header, a ``next`` record if needed and the live ``add`` records; it is
fsynced (whatever ``sync`` says), renamed over the file, and the directory is fsynced.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from teomq._core.crc32c import crc32c

log = logging.getLogger("teomq.deadletters")

MAGIC = b"TQDLQ\x00\x01\n"
#: a record's head: length, crc
RECORD_HEAD = struct.Struct("<II")
MAX_BODY = 0xFFFF_FFFF

#: what a DeadLetter keeps of its history: the last consumers, the last errors, each error cut
MAX_CONSUMERS = 16
MAX_ERRORS = 8
MAX_ERROR_CHARS = 1000
#: ``summary()`` cuts ``detail`` to this many characters
SUMMARY_DETAIL_CHARS = 200
#: records the file may hold beyond twice the live ones before it is compacted
COMPACT_SLACK = 1000

_datasync = getattr(os, "fdatasync", os.fsync)   # macOS has no fdatasync


def _last_consumers(names: Iterable[str]) -> list[str]:
    return [str(n) for n in list(names)[-MAX_CONSUMERS:]]


def _last_errors(errors: Iterable[str]) -> list[str]:
    return [str(e)[:MAX_ERROR_CHARS] for e in list(errors)[-MAX_ERRORS:]]


@dataclasses.dataclass
class DeadLetter:
    """A message the broker gave up on, with what is known of why.

    ``consumers`` keeps the last MAX_CONSUMERS names and ``errors`` the last MAX_ERRORS texts
    (each cut to MAX_ERROR_CHARS), oldest first. ``id`` is 0 until ``DeadLetterQueue.add``
    assigns one.
    """

    id: int = 0
    #: command name; "" for the basic scheme's queue
    route: str = ""
    #: the message as its producer sent it (command mode: the whole command string)
    payload: bytes = b""
    #: "rejected", "max_deliveries", "max_crashes" (or other free text)
    reason: str = ""
    #: the consumer's Reject reason, or the last error text, or ""
    detail: str = ""
    #: deliveries made
    attempts: int = 0
    #: failures the consumer reported (Retry, handler errors)
    nacks: int = 0
    #: endings on the consumer's side (connection died, lease expired)
    crashes: int = 0
    consumers: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    #: the producer's name, "" if unknown
    producer: str = ""
    #: the producer's message id
    msg_id: int = 0
    #: wall-clock time (``time.time()``) the broker accepted the message, 0.0 if unknown
    accepted_at: float = 0.0
    #: wall-clock time it was dead-lettered (now, by default)
    dead_at: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.consumers = _last_consumers(self.consumers)
        self.errors = _last_errors(self.errors)

    def summary(self) -> dict[str, Any]:
        """The fields a listing shows: no payload (its ``size`` instead), ``detail`` cut short."""
        return {
            "id": self.id, "route": self.route, "reason": self.reason,
            "detail": self.detail[:SUMMARY_DETAIL_CHARS],
            "attempts": self.attempts, "crashes": self.crashes, "nacks": self.nacks,
            "dead_at": self.dead_at, "size": len(self.payload),
        }

    def to_doc(self) -> dict[str, Any]:
        """Every field, as msgpack can pack it (``payload`` as bytes)."""
        return {
            "id": self.id, "route": self.route, "payload": bytes(self.payload),
            "reason": self.reason, "detail": self.detail,
            "attempts": self.attempts, "nacks": self.nacks, "crashes": self.crashes,
            "consumers": _last_consumers(self.consumers), "errors": _last_errors(self.errors),
            "producer": self.producer, "msg_id": self.msg_id,
            "accepted_at": self.accepted_at, "dead_at": self.dead_at,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> DeadLetter:
        """The inverse of ``to_doc``. Missing keys get their defaults (``dead_at`` 0.0: unknown);
        unknown keys are ignored. Raises ValueError or TypeError on values of the wrong kind."""
        get = doc.get
        payload = get("payload", b"")
        if isinstance(payload, str):
            payload = payload.encode()
        return cls(
            id=int(get("id", 0)), route=str(get("route", "")), payload=bytes(payload),
            reason=str(get("reason", "")), detail=str(get("detail", "")),
            attempts=int(get("attempts", 0)), nacks=int(get("nacks", 0)),
            crashes=int(get("crashes", 0)),
            consumers=list(get("consumers", ())), errors=list(get("errors", ())),
            producer=str(get("producer", "")), msg_id=int(get("msg_id", 0)),
            accepted_at=float(get("accepted_at", 0.0)), dead_at=float(get("dead_at", 0.0)),
        )


def _record(doc: dict[str, Any]) -> bytes:
    body = msgpack.packb(doc, use_bin_type=True)
    if len(body) > MAX_BODY:
        raise ValueError(f"a dead-letter record of {len(body)} bytes does not fit in a u32 length")
    length = struct.pack("<I", len(body))
    return length + struct.pack("<I", crc32c(body, crc32c(length))) + body


def _decode(body: bytes) -> tuple[str, Any]:
    """A record's body as ("add", DeadLetter) or ("del" | "next", int); ValueError if it is neither."""
    try:
        doc = msgpack.unpackb(body, raw=False)
        if not isinstance(doc, dict):
            raise ValueError("not a map")
        op = doc.get("op")
        if op == "add":
            if not isinstance(doc.get("dl"), dict):
                raise ValueError("add without a dead letter")
            letter = DeadLetter.from_doc(doc["dl"])
            if letter.id < 1:
                raise ValueError(f"add with id {letter.id}")
            return op, letter
        if op in ("del", "next"):
            n = doc.get("id")
            if type(n) is not int:
                raise ValueError(f"{op} with id {n!r}")
            return op, n
        raise ValueError(f"unknown op {op!r}")
    except (TypeError, OverflowError, msgpack.UnpackException) as e:
        raise ValueError(str(e)) from e


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeadLetterQueue:
    """The dead letters, oldest first, at most ``max_entries`` of them, in the file ``path``.

    ``path=None`` keeps them in memory only. Otherwise ``open()`` must be called first: it
    creates the file's directory and reads the file back; the file itself is created by the
    first ``add()``. With ``sync`` (the default) every ``add()`` and ``remove()`` is on disk
    (``fdatasync``) before it returns.
    """

    def __init__(self, path: str | os.PathLike[str] | None, max_entries: int = 10000,
                 *, sync: bool = True) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.max_entries = max_entries
        self.sync = sync
        #: what ``open()`` had to cut from the file, and why; None if it was whole
        self.recovery_note: str | None = None
        #: dead letters evicted past ``max_entries`` since ``open()``
        self.n_evicted = 0
        self._letters: dict[int, DeadLetter] = {}   # by id, oldest (lowest id) first
        self._next_id = 1
        self._fd = -1
        self._end = 0              # bytes known good: writes go here, a failed one is cut back to it
        self._records = 0          # records in the file (add, del, next)
        self._cut_pending = False  # a failed write could not be cut back: cut before the next write
        self._dir_unsynced = False  # the file was created and its directory entry is not synced yet
        self._compact_after = 0    # a compaction failed: not tried again before this many records
        self._is_open = path is None

    # -- opening and closing ------------------------------------------------------------

    def open(self) -> None:
        """Read the file back (see the module's docstring for what is cut, and when).

        Raises ValueError, naming the file, if it is not a dead-letter file of this version
        (the file is left as it is), and OSError if it cannot be read or cut. More entries than
        ``max_entries`` (a lowered limit) are evicted by the next ``add()``.
        """
        if self._is_open and self.path is not None:
            raise RuntimeError(f"{self.path}: the dead-letter queue is already open")
        self.n_evicted = 0
        self.recovery_note = None
        if self.path is None:
            self._is_open = True
            return
        self._letters, self._next_id, self._end, self._records = {}, 1, 0, 0
        self._cut_pending = self._dir_unsynced = False
        self._compact_after = 0
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + ".tmp")    # a compaction's copy left by a crash; the file is whole
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self._is_open = True              # the first add() creates it
            return
        try:
            self._load(fd)
        except BaseException:
            os.close(fd)
            self._letters, self._next_id, self._end, self._records = {}, 1, 0, 0
            raise
        self._fd = fd
        self._is_open = True
        if self.recovery_note:
            log.warning("%s", self.recovery_note)
        self._maybe_compact()

    def close(self) -> None:
        """Close the file; the queue can be opened again."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._is_open = self.path is None

    def _load(self, fd: int) -> None:
        assert self.path is not None
        size = os.fstat(fd).st_size
        letters: dict[int, DeadLetter] = {}
        next_id = 1
        records = 0
        with open(fd, "rb", closefd=False) as f:
            head = f.read(len(MAGIC))
            if head != MAGIC:
                if not MAGIC.startswith(head):
                    if head[:6] == MAGIC[:6]:
                        raise ValueError(f"{self.path}: dead-letter file format version {head[6]}, "
                                         f"this broker reads version {MAGIC[6]}")
                    raise ValueError(f"{self.path}: not a teomq dead-letter file "
                                     f"(it starts with {head!r}, not {MAGIC!r})")
                if head:                      # a crash while the file was being created
                    self._cut(fd, 0, f"{self.path}: torn header ({len(head)} of {len(MAGIC)} "
                                     "bytes), the file was emptied")
                return
            offset = len(MAGIC)
            why = ""
            record_end = size
            while offset < size:
                head = f.read(RECORD_HEAD.size)
                if len(head) < RECORD_HEAD.size:
                    break
                length, crc = RECORD_HEAD.unpack(head)
                record_end = offset + RECORD_HEAD.size + length
                if record_end > size:
                    break
                body = f.read(length)
                if len(body) < length:
                    break
                if crc32c(body, crc32c(head[:4])) != crc:
                    why = "bad CRC"
                    break
                try:
                    op, value = _decode(body)
                except ValueError as e:
                    why = f"undecodable: {e}"
                    break
                if op == "add":
                    letters[value.id] = value
                    next_id = max(next_id, value.id + 1)
                elif op == "del":
                    letters.pop(value, None)
                    next_id = max(next_id, value + 1)
                else:
                    next_id = max(next_id, value)
                records += 1
                offset = record_end
            if offset < size:
                cut = size - offset
                if not why:
                    note = (f"{self.path}: torn tail at offset {offset}: an incomplete record, "
                            f"{cut} bytes cut")
                else:
                    aside = f"{self.path}.damaged-{offset}-{int(time.time())}"
                    f.seek(offset)
                    with open(aside, "wb") as out:
                        shutil.copyfileobj(f, out)
                        out.flush()
                        os.fsync(out.fileno())
                    if record_end < size:
                        note = (f"{self.path}: damaged record at offset {offset} ({why}) in the "
                                f"middle of the file: it and all {cut} bytes after it were cut "
                                f"(saved in {aside}); dead letters recorded after it are lost")
                    else:
                        note = (f"{self.path}: damaged last record at offset {offset} ({why}): "
                                f"{cut} bytes cut (saved in {aside})")
                self._cut(fd, offset, note)
        self._letters, self._next_id, self._end, self._records = letters, next_id, offset, records

    def _cut(self, fd: int, offset: int, note: str) -> None:
        os.ftruncate(fd, offset)
        if self.sync:
            _datasync(fd)
        self.recovery_note = note

    # -- changes --------------------------------------------------------------------------

    def add(self, letters: Iterable[DeadLetter]) -> int:
        """Give ``letters`` the next ids and keep them, on disk before this returns.

        Past ``max_entries`` the oldest are evicted (the new ones too, if the batch alone is
        larger). Returns how many this call evicted. On OSError nothing of the batch is kept and
        no letter's id is changed.
        """
        self._check_open()
        batch = builtins.list(letters)
        if not batch:
            return 0
        ids = range(self._next_id, self._next_id + len(batch))
        n_evict = max(0, len(self._letters) + len(batch) - self.max_entries)
        victims = builtins.list(itertools.islice(self._letters, n_evict))
        victims += ids[:n_evict - len(victims)]
        if self.path is not None:
            records = [_record({"op": "add", "dl": {**dl.to_doc(), "id": i}})
                       for i, dl in zip(ids, batch)]
            records += [_record({"op": "del", "id": i}) for i in victims]
            self._write(records)
        self._next_id = ids.stop
        for i, dl in zip(ids, batch):
            dl.id = i
            self._letters[i] = dl
        for i in victims:
            del self._letters[i]
        self.n_evicted += len(victims)
        self._maybe_compact()
        return len(victims)

    def remove(self, ids: Iterable[int]) -> builtins.list[DeadLetter]:
        """Remove the dead letters ``ids`` (to replay or purge them), on disk before this
        returns; unknown ids are ignored. Returns those removed, in the order asked."""
        self._check_open()
        found = [i for i in dict.fromkeys(ids) if i in self._letters]
        if not found:
            return []
        if self.path is not None:
            self._write([_record({"op": "del", "id": i}) for i in found])
        removed = [self._letters.pop(i) for i in found]
        self._maybe_compact()
        return removed

    def compact(self) -> None:
        """Rewrite the file with the live dead letters only (done by itself when it is due)."""
        self._check_open()
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with open(fd, "wb", closefd=False) as out:
                out.write(MAGIC)
                records = 0
                if self._next_id > max(self._letters, default=0) + 1:
                    out.write(_record({"op": "next", "id": self._next_id}))
                    records += 1
                for i, dl in self._letters.items():
                    out.write(_record({"op": "add", "dl": {**dl.to_doc(), "id": i}}))
                    records += 1
                end = out.tell()
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        old, self._fd = self._fd, fd
        self._end, self._records, self._cut_pending = end, records, False
        if old >= 0:
            os.close(old)
        self._dir_unsynced = True
        _fsync_dir(os.path.dirname(self.path))
        self._dir_unsynced = False

    def _maybe_compact(self) -> None:
        if self._records <= max(2 * len(self._letters) + COMPACT_SLACK, self._compact_after):
            return
        try:
            self.compact()
        except OSError as e:
            self._compact_after = self._records + COMPACT_SLACK
            log.warning("%s: compaction failed, the file is kept as it is: %s", self.path, e)

    def _write(self, records: builtins.list[bytes]) -> None:
        """Append ``records`` in one write and sync them. On OSError the file is cut back to
        where it was (or will be before the next write), and the error propagates."""
        assert self.path is not None
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._dir_unsynced = True
        data = b"".join(records)
        if self._end == 0:
            data = MAGIC + data
        try:
            if self._cut_pending:
                os.ftruncate(self._fd, self._end)
                self._cut_pending = False
            view, offset = memoryview(data), self._end
            while view:                       # pwrite may write less than asked
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
            if self.sync:
                _datasync(self._fd)
                if self._dir_unsynced:
                    _fsync_dir(os.path.dirname(self.path))
                    self._dir_unsynced = False
        except OSError:
            try:
                os.ftruncate(self._fd, self._end)
            except OSError:
                self._cut_pending = True
            raise
        self._end += len(data)
        self._records += len(records)

    def _check_open(self) -> None:
        if not self._is_open:
            raise RuntimeError(f"{self.path}: the dead-letter queue is not open")

    # -- reading --------------------------------------------------------------------------

    def get(self, id: int) -> DeadLetter | None:
        """The dead letter ``id``, or None."""
        return self._letters.get(id)

    def list(self, offset: int = 0, limit: int = 100) -> builtins.list[DeadLetter]:
        """Up to ``limit`` dead letters from the ``offset``-th, oldest first."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must not be negative ({offset}, {limit})")
        return builtins.list(itertools.islice(self._letters.values(), offset, offset + limit))

    def ids(self) -> builtins.list[int]:
        """Every dead letter's id, oldest first."""
        return builtins.list(self._letters)

    def __len__(self) -> int:
        return len(self._letters)
