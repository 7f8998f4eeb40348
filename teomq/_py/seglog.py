"""A pure-Python reader of the broker's log segments (docs/storage.md): the twin the tests hold
the core's SegmentLog (teomq/_core/seglog.pyx) and its recovery against.

``read_segment(path)`` gives the segment's header and every batch in file order, each checked
the way recovery checks it; ``Batch.records`` decodes a batch's records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from teomq._py.crc32c import crc32c

SEG_MAGIC = b"TQSEGLOG"
BATCH_MAGIC = b"TQLB"
VERSION = 1
SEG_HEADER = 64
BATCH_HEADER = 40
REC_PAD, REC_MSG, REC_DELIVERED, REC_DONE, REC_MOVED, REC_TIMES = 0, 1, 2, 3, 4, 5
#: REC_TIMES kinds: not delivered before / removed if not delivered by (wall-clock ms)
TIME_NOT_BEFORE, TIME_EXPIRES = 1, 2
MSG_REC = 32
STATE_REC = 16

_SEG = struct.Struct("<8sHHIQQQIIQI")      # through byte 60 (then the crc)
_BATCH = struct.Struct("<4sHHIIQQI")        # through byte 36 (then the crc)
_MSG = struct.Struct("<BBHIQQQ")
_STATE = struct.Struct("<BBHIQ")


@dataclass
class Record:
    type: int
    seq: int
    offset: int                   # in the segment file
    flags: int = 0
    msg_id: int = 0
    session: int = 0
    name: bytes = b""
    payload: bytes = b""
    attempt: int = 0              # delivered records
    reason: int = 0               # done records; a time record's kind
    time_ms: int = 0              # time records: wall-clock ms since 1970


@dataclass
class Batch:
    offset: int
    length: int                   # body bytes (padded to 8)
    count: int
    first_seq: int
    time_ns: int
    epoch: int
    crc: int
    ok: bool                      # its CRC holds
    body: bytes = field(repr=False, default=b"")

    @property
    def end(self) -> int:
        return self.offset + BATCH_HEADER + self.length

    def records(self) -> list[Record]:
        out: list[Record] = []
        p, body = 0, self.body
        base = self.offset + BATCH_HEADER
        while p < len(body) and body[p] != REC_PAD:
            t = body[p]
            if t in (REC_MSG, REC_MOVED):   # a moved one: a live message copied forward
                _, k, flags, n, seq, mid, sess = _MSG.unpack_from(body, p)
                name = body[p + MSG_REC:p + MSG_REC + k]
                payload = body[p + MSG_REC + k:p + MSG_REC + k + n]
                out.append(Record(t, seq, base + p, flags=flags, msg_id=mid, session=sess, name=name,
                                  payload=payload))
                p += MSG_REC + k + n
            elif t in (REC_DELIVERED, REC_DONE):
                _, reason, _, attempt, seq = _STATE.unpack_from(body, p)
                out.append(Record(t, seq, base + p, attempt=attempt, reason=reason))
                p += STATE_REC
            elif t == REC_TIMES:
                _, kind, hi, lo, seq = _STATE.unpack_from(body, p)
                out.append(Record(t, seq, base + p, reason=kind, time_ms=(hi << 32) | lo))
                p += STATE_REC
            else:
                raise ValueError(f"unknown record type {t} at offset {base + p}")
        return out


@dataclass
class Segment:
    path: Path
    number: int
    base_seq: int
    version: int
    header_ok: bool
    batches: list[Batch]
    data_end: int                 # after the last non-zero byte


def batch_at(data: bytes, off: int) -> Batch | None:
    """The batch header at ``off`` (None if there is not one: too short, or another magic)."""
    if off + BATCH_HEADER > len(data) or data[off:off + 4] != BATCH_MAGIC:
        return None
    magic, version, _flags, length, count, first, t, epoch = _BATCH.unpack_from(data, off)
    crc = struct.unpack_from("<I", data, off + 36)[0]
    body = data[off + BATCH_HEADER:off + BATCH_HEADER + length]
    ok = (length % 8 == 0 and len(body) == length
          and crc32c(body, crc32c(data[off:off + 36])) == crc)
    return Batch(off, length, count, first, t, epoch, crc, ok, body)


def read_segment(path: str | Path) -> Segment:
    """Every whole batch of a segment file in order, as recovery walks it: a batch whose CRC
    fails is listed (ok False) and the walk goes on at the next batch that verifies."""
    p = Path(path)
    data = p.read_bytes()
    magic, version, _hsize, _flags, no, base, _t, _epoch, _r, _size, _r2 = _SEG.unpack_from(data, 0)
    header_ok = crc32c(data[:60]) == struct.unpack_from("<I", data, 60)[0]
    batches: list[Batch] = []
    off = SEG_HEADER
    while off + BATCH_HEADER <= len(data):
        b = batch_at(data, off)
        if b is not None and b.ok:
            batches.append(b)
            off = b.end
            continue
        if data[off:off + BATCH_HEADER] == bytes(BATCH_HEADER):
            break
        q = off + 8
        while q + BATCH_HEADER <= len(data):
            nb = batch_at(data, q)
            if nb is not None and nb.ok:
                break
            q += 8
        bad = b if b is not None else Batch(off, 0, 0, 0, 0, 0, 0, False)
        bad.ok = False
        batches.append(bad)
        if q + BATCH_HEADER > len(data):
            break
        off = q
    return Segment(p, no, base, version, header_ok and magic == SEG_MAGIC, batches,
                   len(data.rstrip(b"\0")))
