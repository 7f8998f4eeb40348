"""Local address book and ``-broker`` argument resolution."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from teomq.addressbook import (
    DEFAULT_PORT,
    AddressBook,
    default_data_dir,
    resolve_broker,
    teomq_home,
)
from teomq.errors import AddressError
from teomq.identity import BrokerIdentity

ADDR = BrokerIdentity.from_seed(bytes(range(32))).address
ADDR2 = BrokerIdentity.from_seed(bytes(range(1, 33))).address


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "teomq-home"
    monkeypatch.setenv("TEOMQ_HOME", str(h))
    return h


def _addr(i: int) -> str:
    return BrokerIdentity.from_seed(i.to_bytes(32, "big")).address


# --- locations --------------------------------------------------------------


def test_home_from_env(home: Path) -> None:
    assert teomq_home() == home
    assert default_data_dir() == home / "broker"
    assert AddressBook().path == home / "addressbook.json"


def test_home_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TEOMQ_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert teomq_home() == tmp_path / ".teomq"
    assert default_data_dir() == tmp_path / ".teomq" / "broker"


# --- record / lookup / forget -----------------------------------------------


def test_missing_file_reads_empty(home: Path) -> None:
    book = AddressBook()
    assert book.lookup(ADDR) is None
    assert book.entries() == {}
    assert not home.exists()  # reading creates nothing


def test_record_lookup_forget(home: Path) -> None:
    book = AddressBook()
    book.record(ADDR, "127.0.0.1", 7051)
    assert book.lookup(ADDR) == ("127.0.0.1", 7051)
    assert book.lookup(ADDR2) is None
    entry = book.entries()[ADDR]
    assert entry["pid"] == os.getpid()
    assert isinstance(entry["updated"], float)
    doc = json.loads((home / "addressbook.json").read_text())
    assert doc["version"] == 1
    assert doc["brokers"][ADDR]["port"] == 7051
    assert book.forget(ADDR) is True
    assert book.lookup(ADDR) is None
    assert book.forget(ADDR) is False


def test_record_overwrites(home: Path) -> None:
    book = AddressBook()
    book.record(ADDR, "127.0.0.1", 7051)
    book.record(ADDR, "::1", 7052)
    assert book.lookup(ADDR) == ("::1", 7052)
    assert list(book.entries()) == [ADDR]


def test_forget_with_pid_only_removes_own_entry(home: Path) -> None:
    book = AddressBook()
    book.record(ADDR, "127.0.0.1", 7051)
    assert book.forget(ADDR, pid=os.getpid() + 1) is False  # an older broker's shutdown
    assert book.lookup(ADDR) == ("127.0.0.1", 7051)
    assert book.forget(ADDR, pid=os.getpid()) is True
    assert book.lookup(ADDR) is None


def test_forget_keeps_other_entries(home: Path) -> None:
    book = AddressBook()
    book.record(ADDR, "127.0.0.1", 1)
    book.record(ADDR2, "127.0.0.1", 2)
    book.forget(ADDR)
    assert book.entries().keys() == {ADDR2}


def test_two_books_see_each_others_writes(home: Path) -> None:
    a, b = AddressBook(), AddressBook()
    a.record(ADDR, "host-a", 1001)
    assert b.lookup(ADDR) == ("host-a", 1001)
    b.record(ADDR2, "host-b", 1002)
    assert a.lookup(ADDR2) == ("host-b", 1002)
    assert a.entries().keys() == b.entries().keys() == {ADDR, ADDR2}
    b.forget(ADDR)
    assert a.lookup(ADDR) is None


def test_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "book.json"
    book = AddressBook(path)
    book.record(ADDR, "example.org", 9)
    assert path.exists()
    assert AddressBook(path).lookup(ADDR) == ("example.org", 9)


@pytest.mark.parametrize(
    "address, host, port",
    [("short", "h", 1), (ADDR, "", 1), (ADDR, "h", 0), (ADDR, "h", 65536), (ADDR, "h", True)],
)
def test_record_rejects_bad_input(home: Path, address: str, host: str, port: int) -> None:
    with pytest.raises(AddressError):
        AddressBook().record(address, host, port)
    assert AddressBook().entries() == {}


def _writer(path: str, worker: int, count: int) -> None:
    book = AddressBook(Path(path))
    for i in range(count):
        book.record(_addr(worker * 1000 + i), f"h{worker}", 1000 + i)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "book.json"
    workers, count = 4, 25
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * workers
    entries = AddressBook(path).entries()
    assert len(entries) == workers * count
    for w in range(workers):
        for i in range(count):
            assert entries[_addr(w * 1000 + i)]["host"] == f"h{w}"
            assert entries[_addr(w * 1000 + i)]["port"] == 1000 + i
    assert len({e["pid"] for e in entries.values()}) == workers
    assert sorted(os.listdir(tmp_path)) == ["book.json", "book.json.lock"]  # no temp files left


# --- corrupt files ----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"",
        b"[]",
        b'{"version": 2, "brokers": {}}',
        b'{"version": 1, "brokers": []}',
    ],
)
def test_corrupt_file_reads_empty(
    home: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    home.mkdir()
    (home / "addressbook.json").write_bytes(content)
    book = AddressBook()
    with caplog.at_level(logging.WARNING, logger="teomq.addressbook"):
        assert book.entries() == {}
        assert book.lookup(ADDR) is None
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    book.record(ADDR, "127.0.0.1", 7051)  # a write repairs it
    assert AddressBook().lookup(ADDR) == ("127.0.0.1", 7051)


def test_bad_entries_are_skipped(home: Path) -> None:
    home.mkdir()
    good = {"host": "127.0.0.1", "port": 7051, "pid": 1, "updated": 0.0}
    doc = {
        "version": 1,
        "brokers": {
            ADDR: good,
            ADDR2: {"host": "127.0.0.1", "port": "7051"},
            "not-an-address": good,
            _addr(3): "junk",
        },
    }
    (home / "addressbook.json").write_text(json.dumps(doc))
    book = AddressBook()
    assert book.entries() == {ADDR: good}
    assert book.lookup(ADDR2) is None


# --- resolve_broker ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (f"{ADDR}@127.0.0.1:7051", ("127.0.0.1", 7051, ADDR)),
        (f"{ADDR}@example.org", ("example.org", DEFAULT_PORT, ADDR)),
        (f"{ADDR}@[::1]:7052", ("::1", 7052, ADDR)),
        (f"{ADDR}@:7053", ("127.0.0.1", 7053, ADDR)),
        ("localhost:7051", ("localhost", 7051, None)),
        ("10.0.0.1:1", ("10.0.0.1", 1, None)),
        ("[::1]:7051", ("::1", 7051, None)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535, None)),
        ("[::1]", ("::1", DEFAULT_PORT, None)),
        (":7051", ("127.0.0.1", 7051, None)),
        ("localhost", ("localhost", DEFAULT_PORT, None)),
        ("  broker.internal:80 ", ("broker.internal", 80, None)),
    ],
)
def test_resolve_forms(home: Path, spec: str, expected: tuple[str, int, str | None]) -> None:
    assert resolve_broker(spec) == expected


def test_default_port() -> None:
    assert DEFAULT_PORT == 7050


def test_resolve_address_from_book(home: Path) -> None:
    AddressBook().record(ADDR, "127.0.0.1", 7059)
    assert resolve_broker(ADDR) == ("127.0.0.1", 7059, ADDR)


def test_resolve_address_from_given_book(tmp_path: Path, home: Path) -> None:
    book = AddressBook(tmp_path / "other.json")
    book.record(ADDR, "10.1.1.1", 7060)
    assert resolve_broker(ADDR, book) == ("10.1.1.1", 7060, ADDR)
    with pytest.raises(AddressError):
        resolve_broker(ADDR)  # not in the default book


def test_resolve_unknown_address(home: Path) -> None:
    with pytest.raises(AddressError) as info:
        resolve_broker(ADDR)
    assert str(info.value) == (
        f"broker address {ADDR} is not in the local address book {home / 'addressbook.json'}; "
        "give it as <address>@host:port or host:port"
    )


def test_base62_string_of_35_chars_is_an_address_not_a_host(home: Path) -> None:
    host_like = "a" * 35
    with pytest.raises(AddressError, match="not in the local address book"):
        resolve_broker(host_like)
    assert resolve_broker("a" * 34) == ("a" * 34, DEFAULT_PORT, None)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "host:",
        "host:abc",
        "host:0",
        "host:65536",
        "host:-1",
        "host:７０５０",  # non-ASCII digits
        ":",
        "::1",
        "::1:7050",
        "[::1",
        "[::1]7050",
        "[]:7050",
        "short@host:7050",
        f"{ADDR}@",
        f"{ADDR}@host:port",
        "a b:7050",
        "host/path:7050",
    ],
)
def test_resolve_errors_name_accepted_forms(home: Path, spec: str) -> None:
    with pytest.raises(AddressError) as info:
        resolve_broker(spec)
    assert "accepted forms" in str(info.value)
    assert "<address>@host:port" in str(info.value)
