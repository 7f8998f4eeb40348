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


class Expired(RequestTimeout):
    """The request's deadline (its timeout) passed before a consumer took it: the broker removed
    it, it was never delivered (``code`` EXPIRED); or, with no word from the broker within a short
    grace past the deadline, the client gave up on it (``code`` 0)."""

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason


class QueueFullError(BrokerError, QueueFull):
    """A request the broker refused with QUEUE_FULL (not accepted; retryable): a BrokerError
    with that code and a QueueFull."""


class DeadLettered(BrokerError):
    """The request went to the broker's dead-letter queue: it failed ``max_deliveries`` times, or
    ended ``max_crashes`` times on its consumers' side (``teomq dlq show`` has its history)."""


class Rejected(BrokerError):
    """A consumer rejected the request (its handler raised :class:`teomq.Reject`); ``reason``
    says why. It is in the dead-letter queue."""


class NoConsumer(BrokerError):
    """``request(..., fail_fast=True)``: nobody consumed the request's queue; not accepted."""


class Cancelled(TeomqError):
    """A ``send()`` whose caller cancelled it (:meth:`teomq.Client.cancel`): withdrawn from the
    broker's queue, or its consumer told; no answer will come."""


class Retry(Exception):
    """Raised by a consumer's handler: this delivery failed, try it again. The message goes
    behind the others of its queue, after ``delay`` seconds, or (``delay`` None) after an
    exponential backoff with jitter (the broker's ``-retry-base`` and ``-retry-max``). Past the
    command's ``max_deliveries`` failures it is dead-lettered."""

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and not delay >= 0:
            raise ValueError(f"delay must be None or a number of seconds >= 0, not {delay!r}")
        super().__init__("retry" if delay is None else f"retry in {delay:g} s")
        self.delay = delay


class Reject(Exception):
    """Raised by a consumer's handler: this message can never succeed. It goes to the
    dead-letter queue at once, and its producer gets :class:`Rejected` with ``reason``."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = str(reason)


class ConnectionLost(TeomqError, ConnectionError):
    """The connection to the broker closed while requests were pending."""


class Reconnecting(ConnectionLost):
    """The client is reconnecting to the broker: this call could not be made now (retryable;
    request(), publish() and drain() wait or buffer instead of raising it)."""


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
