"""The dead-letter queue store (teomq/deadletters.py): real files in tmp_path, no mocks.

``read_records`` is a reader of its own, written from the format in the module's docstring,
so the tests check the file itself and not only what the module reads back.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

import teomq
from teomq._core.crc32c import crc32c
from teomq.deadletters import MAGIC, MAX_CONSUMERS, MAX_ERROR_CHARS, MAX_ERRORS, DeadLetter, DeadLetterQueue


def letter(payload: bytes = b"m", **kw: Any) -> DeadLetter:
    kw.setdefault("route", "orders")
    kw.setdefault("reason", "rejected")
    return DeadLetter(payload=payload, **kw)


def opened(path: Path | None, **kw: Any) -> DeadLetterQueue:
    q = DeadLetterQueue(path, **kw)
    q.open()
    return q


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the file, checked against its length and CRC."""
    data = path.read_bytes()
    assert data[:8] == b"TQDLQ\x00\x01\n"
    records, pos = [], 8
    while pos < len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        body = data[pos + 8:pos + 8 + length]
        assert len(body) == length
        assert crc32c(data[pos:pos + 4] + body) == crc
        records.append(msgpack.unpackb(body))
        pos += 8 + length
    return records


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "dlq" / "deadletters.log"


def test_add_list_get_remove(path: Path) -> None:
    q = opened(path)
    batch = [letter(b"a"), letter(b"b", reason="max_deliveries"), letter(b"c")]
    assert q.add(batch) == 0
    assert [dl.id for dl in batch] == [1, 2, 3]
    assert q.ids() == [1, 2, 3] and len(q) == 3
    assert [dl.payload for dl in q.list()] == [b"a", b"b", b"c"]
    assert [dl.id for dl in q.list(offset=1, limit=1)] == [2]
    assert q.list(offset=5) == []
    got = q.get(2)
    assert got is not None and got.reason == "max_deliveries"
    assert q.get(99) is None

    removed = q.remove([3, 99, 1, 3])
    assert [dl.payload for dl in removed] == [b"c", b"a"]
    assert q.ids() == [2]
    assert q.remove([1]) == []
    assert q.add([letter(b"d")]) == 0
    assert q.ids() == [2, 4]

    ops = [(r["op"], r["dl"]["id"] if r["op"] == "add" else r["id"]) for r in read_records(path)]
    assert ops == [("add", 1), ("add", 2), ("add", 3), ("del", 3), ("del", 1), ("add", 4)]
    q.close()


@pytest.mark.parametrize("sync", [True, False])
def test_reopen_keeps_entries_and_ids(path: Path, sync: bool) -> None:
    q = opened(path, sync=sync)
    q.add([letter(b"one", detail="bad input", attempts=3, nacks=2, crashes=1,
                  consumers=["c1", "c2"], errors=["boom"], producer="p", msg_id=77,
                  accepted_at=1000.5, dead_at=1001.25)])
    q.add([letter(b"two"), letter(b"three")])
    q.remove([3])
    before = q.list()
    q.close()

    q = opened(path, sync=sync)
    assert q.recovery_note is None
    assert q.list() == before
    assert q.ids() == [1, 2]
    q.add([letter(b"four")])
    assert q.ids() == [1, 2, 4]        # 3 was deleted, and is not given again
    q.close()


def test_eviction_past_max_entries(path: Path) -> None:
    q = opened(path, max_entries=3)
    assert q.add([letter(bytes([i])) for i in range(2)]) == 0
    assert q.add([letter(b"x"), letter(b"y")]) == 1
    assert q.ids() == [2, 3, 4] and q.n_evicted == 1
    assert q.add([letter(bytes([i])) for i in range(5)]) == 5    # the batch alone is over the limit
    assert q.ids() == [7, 8, 9] and q.n_evicted == 6
    q.close()

    q = opened(path, max_entries=3)
    assert q.ids() == [7, 8, 9]
    assert q.n_evicted == 0            # counted since open
    assert q.add([letter(b"z")]) == 1
    assert q.ids() == [8, 9, 10]
    q.close()

    q = opened(path, max_entries=2)    # a lowered limit: the next add() evicts down to it
    assert len(q) == 3
    assert q.add([letter(b"w")]) == 2
    assert q.ids() == [10, 11]
    q.close()


def test_torn_tail_is_cut(path: Path) -> None:
    q = opened(path)
    for p in (b"first", b"second", b"third"):
        q.add([letter(p)])
    q.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 5)

    q = opened(path)
    assert [dl.payload for dl in q.list()] == [b"first", b"second"]
    assert q.recovery_note is not None and "torn tail" in q.recovery_note
    assert len(read_records(path)) == 2       # cut back to the last whole record
    q.add([letter(b"fourth")])
    q.close()

    q = opened(path)
    assert q.recovery_note is None
    assert [dl.payload for dl in q.list()] == [b"first", b"second", b"fourth"]
    q.close()


def test_torn_header_is_a_new_file(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(MAGIC[:3])
    q = opened(path)
    assert len(q) == 0
    assert q.recovery_note is not None and "torn header" in q.recovery_note
    q.add([letter(b"a")])
    q.close()
    assert [r["dl"]["payload"] for r in read_records(path)] == [b"a"]


def test_flipped_byte_in_last_record(path: Path) -> None:
    q = opened(path)
    q.add([letter(b"good")])
    q.add([letter(b"will be damaged")])
    q.close()
    data = bytearray(path.read_bytes())
    data[data.rindex(b"damaged")] ^= 0x01
    path.write_bytes(bytes(data))

    q = opened(path)
    assert [dl.payload for dl in q.list()] == [b"good"]
    note = q.recovery_note
    assert note is not None and "bad CRC" in note and "last record" in note
    saved = list(path.parent.glob("deadletters.log.damaged-*"))
    assert len(saved) == 1 and b"will be" in saved[0].read_bytes()
    assert len(read_records(path)) == 1
    q.close()


def test_damaged_record_in_the_middle(path: Path) -> None:
    q = opened(path)
    for p in (b"one", b"two-damaged", b"three"):
        q.add([letter(p)])
    q.close()
    data = bytearray(path.read_bytes())
    data[data.index(b"two-damaged")] ^= 0xFF
    path.write_bytes(bytes(data))

    q = opened(path)
    assert [dl.payload for dl in q.list()] == [b"one"]    # replay stops at the damage
    assert q.recovery_note is not None and "middle" in q.recovery_note
    assert len(read_records(path)) == 1
    saved = list(path.parent.glob("deadletters.log.damaged-*"))
    assert len(saved) == 1 and b"three" in saved[0].read_bytes()
    q.close()


@pytest.mark.parametrize("content", [b"GARBAGE!more bytes", b"TQDLQ\x00\x02\n", b"{}"])
def test_bad_header_raises_and_leaves_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    q = DeadLetterQueue(path)
    with pytest.raises(ValueError, match="deadletters.log"):
        q.open()
    assert path.read_bytes() == content
    with pytest.raises(RuntimeError):
        q.add([letter()])


def test_compaction_keeps_live_ones_and_ids_increase(path: Path) -> None:
    q = opened(path, sync=False)       # compaction syncs whatever `sync` says; this saves 3000 syncs
    q.add([letter(b"keep-%d" % i) for i in range(5)])
    for i in range(1500):
        q.add([letter(b"churn")])
        q.remove([6 + i])
    assert q.ids() == [1, 2, 3, 4, 5]
    records = read_records(path)
    assert len(records) <= 2 * 5 + 1000 + 1
    q.close()

    q = opened(path)
    assert q.recovery_note is None
    assert [dl.payload for dl in q.list()] == [b"keep-%d" % i for i in range(5)]
    q.compact()
    records = read_records(path)
    assert records[0] == {"op": "next", "id": 1506}     # the highest id (1505) was deleted
    assert [r["dl"]["id"] for r in records[1:]] == [1, 2, 3, 4, 5]
    assert not path.with_name(path.name + ".tmp").exists()
    q.add([letter(b"new")])
    assert q.ids()[-1] == 1506
    q.close()

    q = opened(path)
    assert q.ids() == [1, 2, 3, 4, 5, 1506]
    q.close()


def test_stale_compaction_copy_is_removed(path: Path) -> None:
    q = opened(path)
    q.add([letter(b"a")])
    q.close()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(MAGIC + b"half a copy")
    q = opened(path)
    assert not tmp.exists() and q.ids() == [1]
    q.close()


def test_in_memory(tmp_path: Path) -> None:
    q = DeadLetterQueue(None, max_entries=2)
    assert q.add([letter(b"a"), letter(b"b"), letter(b"c")]) == 1
    assert q.ids() == [2, 3] and q.n_evicted == 1
    assert [dl.payload for dl in q.remove([2])] == [b"b"]
    q.add([letter(b"d")])
    assert q.ids() == [3, 4]
    q.open()
    q.close()
    assert q.ids() == [3, 4]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "dlq"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        q = opened(directory / "deadletters.log")
        batch = [letter(b"a"), letter(b"b")]
        with pytest.raises(OSError):
            q.add(batch)
        assert len(q) == 0 and q.ids() == [] and q.list() == []
        assert [dl.id for dl in batch] == [0, 0]
    finally:
        directory.chmod(0o700)
    q.add(batch)
    assert q.ids() == [1, 2]
    q.close()


# A write cut short by the file size limit (RLIMIT_FSIZE), as a full disk would: the first
# pwrite writes part of the batch, the next fails with EFBIG. Run apart, since the limit and
# SIGXFSZ are per process; works as root too.
_SHORT_WRITE = r"""
import json, os, resource, signal, sys
from teomq.deadletters import DeadLetter, DeadLetterQueue
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
q = DeadLetterQueue(path)
q.open()
q.add([DeadLetter(payload=b"kept")])
size = os.path.getsize(path)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
batch = [DeadLetter(payload=b"x" * 300) for _ in range(3)]
try:
    q.add(batch)
    error = None
except OSError as e:
    error = e.errno
out = {"error": error, "size_unchanged": os.path.getsize(path) == size,
       "ids": q.ids(), "batch_ids": [d.id for d in batch]}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
q.add([DeadLetter(payload=b"after")])
q.close()
print(json.dumps(out))
"""


def test_short_write_keeps_nothing_and_file_stays_readable(path: Path) -> None:
    root = str(Path(teomq.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["error"] is not None
    assert out["size_unchanged"]            # the partial write was cut back at once
    assert out["ids"] == [1] and out["batch_ids"] == [0, 0, 0]

    q = opened(path)
    assert q.recovery_note is None
    assert [dl.payload for dl in q.list()] == [b"kept", b"after"]
    assert q.ids() == [1, 2]
    q.close()


def test_doc_round_trip_summary_and_bounds() -> None:
    dl = DeadLetter(id=7, route="", payload=b"\x00\xff", reason="max_crashes", detail="d" * 500,
                    attempts=4, nacks=1, crashes=3,
                    consumers=[f"c{i}" for i in range(20)], errors=[f"e{i}" + "x" * 2000 for i in range(10)],
                    producer="prod", msg_id=12, accepted_at=1.5, dead_at=2.5)
    assert dl.consumers == [f"c{i}" for i in range(20 - MAX_CONSUMERS, 20)]
    assert len(dl.errors) == MAX_ERRORS and dl.errors[0].startswith("e2")
    assert all(len(e) == MAX_ERROR_CHARS for e in dl.errors)

    doc = dl.to_doc()
    assert DeadLetter.from_doc(msgpack.unpackb(msgpack.packb(doc, use_bin_type=True))) == dl
    assert dl.summary() == {"id": 7, "route": "", "reason": "max_crashes", "detail": "d" * 200,
                            "attempts": 4, "crashes": 3, "nacks": 1, "dead_at": 2.5, "size": 2}

    empty = DeadLetter.from_doc({"id": 3, "unknown": "ignored"})
    assert (empty.id, empty.payload, empty.reason, empty.consumers, empty.dead_at) == (3, b"", "", [], 0.0)
