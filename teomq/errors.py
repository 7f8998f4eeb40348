"""Exceptions shared by the Cython core, its pure-Python twin and the control plane."""

from __future__ import annotations

from typing import Self


class TeomqError(Exception):
    """Base class of every teomq error."""


class ProtocolError(TeomqError):
    """Bad input on the wire. ``code`` is an :class:`teomq.protocol.ErrorCode` value.

    The core raises only this for bad bytes; anything else escaping it is a bug.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason

    def __reduce__(self) -> tuple[type[Self], tuple[int, str]]:  # keep picklable with two arguments
        return (type(self), (self.code, self.reason))


class QueueFull(TeomqError):
    """A bounded queue or buffer reached its configured limit."""


class BrokerError(TeomqError):
    """The broker answered a request with an ERROR frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (code {code})")
        self.code = int(code)
        self.reason = reason


class StorageError(TeomqError):
    """The broker's durable store failed: a disk error, a data directory in use, a bad log.
    ``errno`` is the OS error number behind it, or 0."""

    def __init__(self, reason: str, errno: int = 0) -> None:
        super().__init__(reason)
        self.errno = errno


class LogFormatError(StorageError):
    """A log segment the broker cannot read: another format version, or a record past its batch."""


class RequestTimeout(TeomqError, TimeoutError):
    """No answer arrived within the request's timeout."""


class ConnectionLost(TeomqError, ConnectionError):
    """The connection to the broker closed while requests were pending."""


class AddressError(TeomqError, ValueError):
    """A broker address could not be resolved or did not verify."""


class UnknownCommand(TeomqError, LookupError):
    """A command string names no command of the schema.

    ``name`` is the name as received (bytes); the message is the original's
    ``command '<name>' not found`` (names over 256 bytes are shortened to 256 and ``...``).
    """

    def __init__(self, name: bytes) -> None:
        self.name = bytes(name)
        shown = self.name[:256].decode("utf-8", "replace") + ("..." if len(self.name) > 256 else "")
        super().__init__(f"command '{shown}' not found")

    def __reduce__(self) -> tuple[type[Self], tuple[bytes]]:
        return (type(self), (self.name,))


class BadPacket(TeomqError, ValueError):
    """A teoproxy packet (the WebSocket gateway's wire format) that cannot be accepted.

    ``id`` and ``cmd`` are the packet's own where they could be read (else 0), so the error
    packet sent back can carry them; ``reason`` is the text that error packet carries.
    """

    def __init__(self, reason: str, id: int = 0, cmd: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.id = int(id)
        self.cmd = int(cmd)

    def __reduce__(self) -> tuple[type[Self], tuple[str, int, int]]:
        return (type(self), (self.reason, self.id, self.cmd))
