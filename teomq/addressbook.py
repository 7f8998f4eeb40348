"""Local address book: lets ``teomq consumer -broker=<address>`` find a broker on this machine.

A running broker records ``address -> host, port`` in ``$TEOMQ_HOME/addressbook.json``
(default ``~/.teomq``); clients look the address up there and then verify, on connect,
that the broker really holds that address (see :func:`teomq.identity.verify_welcome`).

File format::

    {"version": 1,
     "brokers": {"<address>": {"host": "127.0.0.1", "port": 7050,
                               "pid": 1234, "updated": 1700000000.0}}}

Writers take an exclusive ``flock`` on ``addressbook.json.lock`` for the whole
read-modify-write and publish with ``os.replace``; readers take no lock and always
see a whole file. A missing or corrupt file reads as empty.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from teomq.errors import AddressError
from teomq.identity import is_address

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_WEB_PORT",
    "AddressBook",
    "default_data_dir",
    "resolve_broker",
    "teomq_home",
]

log = logging.getLogger("teomq.addressbook")

DEFAULT_PORT = 7050
#: The broker's web port (the original web consumer's): WebSocket gateway and pages.
DEFAULT_WEB_PORT = 8094
_VERSION = 1
_ACCEPTED_FORMS = (
    "accepted forms: <address>@host:port, <address> (looked up in the local address book), "
    f"host:port, [ipv6]:port, host (port {DEFAULT_PORT}), :port (127.0.0.1)"
)

Entry = dict[str, Any]


def teomq_home() -> Path:
    """``$TEOMQ_HOME`` if set, else ``~/.teomq``."""
    home = os.environ.get("TEOMQ_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".teomq"


def default_data_dir() -> Path:
    """Where a broker keeps its key and data unless told otherwise."""
    return teomq_home() / "broker"


def _valid_port(port: object) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("host"), str)
        and bool(entry["host"])
        and _valid_port(entry.get("port"))
    )


class AddressBook:
    """Broker addresses known on this machine, shared by every process of one user."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else teomq_home() / "addressbook.json"
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def record(self, address: str, host: str, port: int) -> None:
        """Publish that the broker ``address`` listens on ``host:port`` (owned by this process)."""
        if not is_address(address):
            raise AddressError(f"not a broker address: {address!r}")
        if not host or not _valid_port(port):
            raise AddressError(f"bad endpoint {host!r}:{port!r} for broker {address}")
        with self._locked():
            brokers = self._read()
            brokers[address] = {
                "host": host,
                "port": int(port),
                "pid": os.getpid(),
                "updated": time.time(),
            }
            self._write(brokers)

    def lookup(self, address: str) -> tuple[str, int] | None:
        """``(host, port)`` recorded for ``address``, or None."""
        entry = self._read().get(address)
        if entry is None:
            return None
        return entry["host"], entry["port"]

    def forget(self, address: str, pid: int | None = None) -> bool:
        """Remove ``address``; with ``pid``, only if that process recorded it.

        A broker passes its own pid on shutdown so that it cannot remove the entry
        of a newer broker with the same key. Returns True if an entry was removed.
        """
        with self._locked():
            brokers = self._read()
            entry = brokers.get(address)
            if entry is None or (pid is not None and entry.get("pid") != pid):
                return False
            del brokers[address]
            self._write(brokers)
            return True

    def entries(self) -> dict[str, Entry]:
        """Every valid entry, ``{address: {"host", "port", "pid", "updated"}}``."""
        return self._read()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the book's exclusive writer lock."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> dict[str, Entry]:
        """The valid entries on disk; empty if the file is missing or corrupt."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("cannot read address book %s (%s); treating it as empty", self.path, e)
            return {}
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            log.warning("address book %s is corrupt (not JSON); treating it as empty", self.path)
            return {}
        if (
            not isinstance(doc, dict)
            or doc.get("version") != _VERSION
            or not isinstance(doc.get("brokers"), dict)
        ):
            log.warning(
                "address book %s is corrupt (not a version %d book); treating it as empty",
                self.path,
                _VERSION,
            )
            return {}
        brokers: dict[str, Entry] = {}
        for address, entry in doc["brokers"].items():
            if is_address(address) and _valid_entry(entry):
                brokers[address] = entry
            else:
                log.warning("address book %s: skipping bad entry %r", self.path, address)
        return brokers

    def _write(self, brokers: dict[str, Entry]) -> None:
        """Replace the file with ``brokers``; caller must hold the lock."""
        data = json.dumps({"version": _VERSION, "brokers": brokers}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def _bad(spec: str, why: str) -> AddressError:
    return AddressError(f"bad broker {spec!r}: {why}; {_ACCEPTED_FORMS}")


def _parse_port(spec: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _bad(spec, f"port {text!r} is not a number")
    port = int(text)
    if not 0 < port < 65536:
        raise _bad(spec, f"port {port} is out of range 1-65535")
    return port


def _check_host(spec: str, host: str) -> str:
    if not host or any(c.isspace() or c in "/@[]" for c in host):
        raise _bad(spec, f"bad host {host!r}")
    return host


def _parse_endpoint(spec: str, endpoint: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` or ``:port`` -> (host, port)."""
    if not endpoint:
        raise _bad(spec, "empty endpoint")
    if endpoint.startswith("["):
        close = endpoint.find("]")
        if close < 0:
            raise _bad(spec, "missing ']' after IPv6 address")
        host = endpoint[1:close]
        rest = endpoint[close + 1 :]
        if not host or any(c.isspace() or c in "/@[]" for c in host):
            raise _bad(spec, f"bad IPv6 address {host!r}")
        if not rest:
            return host, DEFAULT_PORT
        if not rest.startswith(":"):
            raise _bad(spec, f"unexpected {rest!r} after ']'")
        return host, _parse_port(spec, rest[1:])
    colons = endpoint.count(":")
    if colons == 0:
        return _check_host(spec, endpoint), DEFAULT_PORT
    if colons > 1:
        raise _bad(spec, "an IPv6 address must be written in brackets, e.g. [::1]:7050")
    host, _, port_text = endpoint.partition(":")
    port = _parse_port(spec, port_text)
    if not host:
        return "127.0.0.1", port
    return _check_host(spec, host), port


def resolve_broker(spec: str, book: AddressBook | None = None) -> tuple[str, int, str | None]:
    """Turn a ``-broker`` argument into ``(host, port, expected_address_or_None)``.

    Accepted: ``<address>@host:port``, ``<address>`` (looked up in ``book``, default the
    local address book), ``host:port``, ``[ipv6]:port``, ``host`` (port
    :data:`DEFAULT_PORT`) and ``:port`` (127.0.0.1). A 35-character base62 string alone
    is an address, never a host name. Raises :class:`AddressError` otherwise.
    """
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec:
        raise _bad(spec, "empty")
    if "@" in spec:
        address, _, endpoint = spec.partition("@")
        if not is_address(address):
            raise _bad(spec, f"{address!r} before '@' is not a 35-character broker address")
        host, port = _parse_endpoint(spec, endpoint)
        return host, port, address
    if is_address(spec):
        if book is None:
            book = AddressBook()
        found = book.lookup(spec)
        if found is None:
            raise AddressError(
                f"broker address {spec} is not in the local address book {book.path}; "
                "give it as <address>@host:port or host:port"
            )
        return found[0], found[1], spec
    host, port = _parse_endpoint(spec, spec)
    return host, port, None
