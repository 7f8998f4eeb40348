"""The broker's control plane: listening socket, handshakes, timers, logging, shutdown.

Message traffic never passes through this module: each connection is a
:class:`teomq._core.connection.CoreConnection` whose read path (``get_buffer`` /
``buffer_updated``) runs in the Cython core. Python is called for a connection's HELLO,
an ERROR frame a client sends, bad input, the handshake timer, flow control and, in
command mode, the commands the broker answers itself (subscribe, unsubscribe, hello, an
unknown command).

A client inside the broker's process (a web gateway session) is an :class:`InprocClient`:
an :class:`~teomq._core.inproc.InprocEndpoint` of the dispatcher, no frames, with the same
control plane as a connection (:class:`ControlledEndpoint`: its log lines, back-pressure,
broker commands, refusals and shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgpack

from teomq import __version__
from teomq._core.command_parser import CommandTable
from teomq._core.connection import CoreConnection
from teomq._core.dispatch import CMD_UNKNOWN, CMD_UNKNOWN_API, Dispatcher
from teomq._core.msglog import MessageLog
from teomq._core.endpoint import Endpoint
from teomq._core.inproc import InprocEndpoint
from teomq._core.routes import KINDS
from teomq._core.frame_codec import encode_frame
from teomq.addressbook import DEFAULT_PORT, AddressBook, default_data_dir
from teomq.storage import (
    DEFAULT_MEMORY_MAX,
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_MEMORY_MAX,
    MIN_SEGMENT_SIZE,
    STORAGE_MODES,
    DiskStorage,
    FsyncPolicy,
)
from teomq.commands import (
    BROKER_COMMANDS,
    DEFAULT_DLQ_MAX,
    DEFAULT_LEASE,
    DEFAULT_MAX_CRASHES,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_RETRY_BASE,
    DEFAULT_RETRY_MAX,
    DLQ_LIST_MAX,
    Command,
    CommandSchema,
)
from teomq.deadletters import DeadLetter, DeadLetterQueue
from teomq.errors import ProtocolError, UnknownCommand
from teomq.identity import BrokerIdentity, welcome_signature_payload
from teomq.transports import socket_writer
from teomq.protocol import CAPABILITIES, DEFAULT_MAX_PAYLOAD, FLOW_HOLD, ApiCommand, ErrorCode, Flag, FrameType

log = logging.getLogger("teomq.broker")
msg_log = logging.getLogger("teomq.broker.messages")

DEFAULT_PREFETCH = 64
#: Most consecutive messages of one queue a consumer takes before the next one's turn.
DEFAULT_DISPATCH_RUN = 16
_SUBSCRIBE, _UNSUBSCRIBE, _HELLO = KINDS["subscribe"], KINDS["unsubscribe"], KINDS["hello"]
#: The most credit one consumer gets; a larger prefetch is granted as this (WELCOME says so).
MAX_PREFETCH = 65535
#: longest session id a HELLO may give (the id a client keeps for the life of its object)
MAX_SESSION = 128
#: Seconds between the dispatcher's clock ticks (Dispatcher.tick: leases, later deadlines).
TICK_INTERVAL = 0.25
#: Seconds between the broker's summaries of refused messages (the first is logged at once).
REFUSAL_LOG_INTERVAL = 1.0
_ROLES = ("producer", "consumer", "both")


def error_payload(code: int, reason: str) -> bytes:
    """Payload of an ERROR frame."""
    return msgpack.packb({"code": int(code), "reason": reason})


class ControlledEndpoint:
    """What the control plane keeps of an endpoint besides the core's state: who it is (role,
    name, peer), the refusals already logged, back-pressure on its sends, the broker commands its
    messages carry (hello, subscribe, unsubscribe, unknown names) and the end of it.

    The mixin of :class:`BrokerConnection` (a wire connection) and :class:`InprocClient` (an
    endpoint inside the broker); each says how its output goes (``_output``) and how it is closed.
    """

    broker: Broker
    name: str
    role: str
    peer: str
    caps: frozenset[str]  # capabilities the client announced in HELLO
    refused_logged: tuple[int, int]  # (n_refused, n_refused_parked) already reported in a log line

    if TYPE_CHECKING:  # the core's Endpoint (and its subclasses) has these
        hold_sends: bool

        @property
        def consumer(self) -> bool: ...
        @property
        def detached(self) -> bool: ...
        @property
        def handshaken(self) -> bool: ...
        @property
        def n_refused(self) -> int: ...
        @property
        def n_refused_parked(self) -> int: ...
        @property
        def parked_sends(self) -> int: ...
        def release_sends(self) -> None: ...

    def _output(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        """Queue an item of the control plane's (a REPLY, an ERROR, a FLOW) to this endpoint."""
        raise NotImplementedError

    def _close_with_error(self, code: int, reason: str) -> None:
        """Send what is pending, then the ERROR; requeue what it held; close."""
        raise NotImplementedError

    def pause_for(self, reason: str) -> None:
        """Stop taking what this peer sends until every reason given is withdrawn."""
        raise NotImplementedError

    def resume_for(self, reason: str) -> None:
        raise NotImplementedError

    def hold(self, on: bool) -> None:
        """Back-pressure on this endpoint's SENDs: they wait, unaccepted, in order.

        Its SENDs (and PINGs after them) are parked in the core (bounded; past that,
        QUEUE_FULL), and a client that announced the ``flow`` capability is told to hold
        them back. A pure producer's reads are paused as well (Broker.hold_back); the reads
        of a client that also consumes go on, since its answers free the room it waits for.
        """
        if self.detached or on == self.hold_sends:
            return
        self.hold_sends = on
        if "flow" in self.caps:
            self._output(FrameType.FLOW, FLOW_HOLD if on else 0, 0, b"")
        if not on and self.parked_sends:
            asyncio.get_running_loop().call_soon(self.release_sends)

    def on_command(self, kind: int, fid: int, flags: int, data: bytes) -> None:
        """A SEND for the broker itself (see Dispatcher.accept_command); rare, so in Python."""
        if kind == _HELLO:
            self._reply(fid, flags, b"Hello " + data)
        elif kind in (_SUBSCRIBE, _UNSUBSCRIBE):
            self._subscription(kind == _SUBSCRIBE, fid, flags, data)
        elif kind == CMD_UNKNOWN:
            self._refuse(fid, ErrorCode.UNKNOWN_COMMAND, str(UnknownCommand(data)))
        elif kind == CMD_UNKNOWN_API and data[:1] == bytes((ApiCommand.DLQ,)):
            self.broker._dlq_command(self, fid, flags, data[1:])
        elif kind == CMD_UNKNOWN_API:
            known = (f"the broker has {int(ApiCommand.HELLO)} hello, {int(ApiCommand.MSG)} msg and "
                     f"{int(ApiCommand.DLQ)} dlq")
            self._refuse(fid, ErrorCode.UNKNOWN_COMMAND,
                         f"API command {data[0]} not found ({known})" if data
                         else f"API SEND without a command number ({known})")
        else:  # pragma: no cover - the core passes only the kinds above
            raise AssertionError(f"unexpected command kind {kind}")

    def _subscription(self, on: bool, fid: int, flags: int, name: bytes) -> None:
        verb = "subscribe" if on else "unsubscribe"
        disp = cast(Dispatcher, self.broker._disp)  # set by start(), before any connection
        if not self.consumer:
            self._refuse(fid, ErrorCode.NOT_ALLOWED,
                         f"only a consumer can {verb}: connect with role consumer or both")
            return
        me = cast(Endpoint, self)  # a mixin of Endpoint subclasses
        status = disp.subscribe(me, name) if on else disp.unsubscribe(me, name)
        shown = name.decode("utf-8", "replace")
        if status == -1:
            self._refuse(fid, ErrorCode.UNKNOWN_COMMAND, str(UnknownCommand(name)))
            return
        if status == -2:
            self._refuse(fid, ErrorCode.NOT_ALLOWED, f"'{shown}' is a broker command: nothing to {verb}")
            return
        self._reply(fid, flags, b"OK")  # before any DELIVER the subscription makes possible
        if status == 0:
            log.info("%s %s %sd %s %s", self.role, self.name, verb, "to" if on else "from", shown)
            disp.pump_now()

    def _reply(self, fid: int, flags: int, answer: bytes) -> None:
        if not flags & Flag.NO_REPLY:
            self._output(FrameType.REPLY, 0, fid, answer)

    def _refuse(self, fid: int, code: int, reason: str) -> None:
        """Refuse one SEND (the connection stays): an ERROR with its id and a log line."""
        self.broker._errors += 1
        log.warning("%s %s (%s): message #%d refused: %s", self.role, self.name, self.peer, fid, reason)
        self._output(FrameType.ERROR, 0, fid, error_payload(code, reason))

    def on_internal_error(self, exc: BaseException) -> None:
        # A bug of ours, not bad input: the frame it failed on is consumed, the connection is
        # closed (what it held goes back to its queue), everyone else is served on.
        self.broker._errors += 1
        log.error("closing connection %s (%s %s): internal error while handling its frame",
                  self.peer, self.role, self.name, exc_info=exc)
        self._close_with_error(ErrorCode.INTERNAL, "the broker failed to handle a frame of this "
                               "connection (logged at the broker); closing")

    def _log_gone(self, exc: Exception | None) -> None:
        """The log lines of an endpoint that goes: disconnected, refusals not yet logged, parked sends."""
        if self.handshaken:
            log.info("%s %s (%s) disconnected%s", self.role, self.name, self.peer,
                     f": {exc}" if exc else "")
        if (self.n_refused, self.n_refused_parked) != self.refused_logged:
            self.broker._log_refusals(self)
        if self.parked_sends:  # held back, never accepted: the client had no answer or PONG for them
            log.warning("%s %s (%s) closed with %d frames held back, not accepted (nothing of them was "
                        "confirmed)", self.role, self.name, self.peer, self.parked_sends)


class BrokerConnection(ControlledEndpoint, CoreConnection, asyncio.BufferedProtocol):
    """A client connection: the core's read path plus the asyncio protocol callbacks."""

    def __init__(self, disp: Dispatcher, broker: Broker) -> None:
        self.broker = broker
        self.name = "?"
        self.role = "?"
        self.peer = "?"
        self._hs_timer: asyncio.TimerHandle | None = None
        self._paused: set[str] = set()  # why reading is paused: "write", "queue"
        self.caps = frozenset()
        self.refused_logged = (0, 0)

    # -- asyncio.BaseProtocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream's: a socket's, or a TLS one's
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.set_writer(socket_writer(transport))  # None past TLS or a wrapping transport
        self.broker._conns.add(self)
        loop = asyncio.get_running_loop()
        self._hs_timer = loop.call_later(self.broker.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.broker._conns.discard(self)
        self._log_gone(exc)
        self.detach()
        self.transport = None

    def pause_writing(self) -> None:
        # The peer does not read what we send: stop reading what it sends.
        self.pause_for("write")

    def resume_writing(self) -> None:
        self.resume_for("write")

    def pause_for(self, reason: str) -> None:
        """Stop reading from this peer until every reason given is withdrawn."""
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_for(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _output(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        self.send_frame(ftype, flags, fid, payload)

    # -- hooks called by the core ----------------------------------------------------------

    def on_control(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        if ftype == FrameType.HELLO:
            self._hello(fid, payload)
        elif ftype == FrameType.ERROR:
            log.warning("%s %s (%s) reported an error: %s", self.role, self.name, self.peer,
                        _error_text(payload))
        else:
            raise ProtocolError(ErrorCode.HANDSHAKE,
                                f"expected HELLO as the first frame, got frame type {ftype}")

    def on_protocol_error(self, exc: ProtocolError) -> None:
        self.broker._errors += 1
        log.warning("closing connection %s (%s %s): %s (error %d)", self.peer, self.role, self.name,
                    exc.reason, exc.code)
        self._close_with_error(exc.code, exc.reason)

    # -- control plane ---------------------------------------------------------------------

    def _hello(self, fid: int, payload: bytes) -> None:
        if self.handshaken:
            raise ProtocolError(ErrorCode.HANDSHAKE, "second HELLO on one connection")
        try:
            hello = msgpack.unpackb(payload, raw=False)
        except Exception:
            hello = None
        if not isinstance(hello, dict):
            raise ProtocolError(ErrorCode.HANDSHAKE, "HELLO payload is not a msgpack map")
        if hello.get("v") != 1:
            raise ProtocolError(ErrorCode.HANDSHAKE, f"unsupported HELLO version {hello.get('v')!r}: this broker "
                                f"(teomq/{__version__}) speaks protocol version 1")
        role = hello.get("role", "producer")
        if role not in _ROLES:
            raise ProtocolError(ErrorCode.HANDSHAKE, f"unknown role {role!r}")
        name = hello.get("name") or f"client@{self.peer}"
        nonce = hello.get("nonce", b"")
        prefetch = hello.get("prefetch") or DEFAULT_PREFETCH
        caps = hello.get("caps", [])
        if not isinstance(name, str) or not isinstance(nonce, bytes) or len(nonce) > 64:
            raise ProtocolError(ErrorCode.HANDSHAKE, "HELLO name must be text and nonce at most 64 bytes")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ProtocolError(ErrorCode.HANDSHAKE, f"bad prefetch {prefetch!r}")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ProtocolError(ErrorCode.HANDSHAKE, f"HELLO caps must be a list of names, not {caps!r:.80}")
        session = hello.get("session")
        if isinstance(session, str):
            session = session.encode()
        if session is not None and (not isinstance(session, bytes) or not 0 < len(session) <= MAX_SESSION):
            raise ProtocolError(ErrorCode.HANDSHAKE, f"HELLO session must be text or bytes of 1..{MAX_SESSION}")
        disp = cast(Dispatcher, self.broker._disp)  # set by start(), before any connection
        if session is not None and disp.session_of(session) is not None:
            # a session lives as long as its connection, and one connection has it at a time
            raise ProtocolError(ErrorCode.HANDSHAKE, "this session is already connected")
        self._cancel_timer()
        self.name = name[:200]
        self.log_name = _one_line(self.name).encode("utf-8", "replace")
        self.role = role
        self.caps = frozenset(caps).intersection(CAPABILITIES)  # unknown ones are ignored
        self.confirms = "confirm" in self.caps  # its SENDs flagged CONFIRM get CONFIRM frames
        self.leases = "lease" in self.caps  # late answers: LEASE_EXPIRED; RETRY and REJECT honoured
        self.cancels = "cancel" in self.caps  # told (CANCEL) when a producer withdraws a delivery
        granted = min(prefetch, MAX_PREFETCH)
        b = self.broker
        identity = cast(BrokerIdentity, b.identity)  # set by start(), before any connection
        welcome = {
            "v": 1,
            "address": b.address,
            "pubkey": identity.public_key,
            "sig": identity.sign(welcome_signature_payload(nonce)),
            "max_payload": b.max_payload,
            "server": f"teomq/{__version__}",
            "scheme": "basic" if b.commands is None else "command",
            "caps": list(CAPABILITIES),
            "session": session is not None,
        }
        if role != "producer":
            welcome["prefetch"] = granted
            welcome["lease"] = cast(Dispatcher, b._disp).min_lease()  # a consumer's TOUCH comes well within it
        if b.commands is not None and hello.get("commands") is True:
            welcome["commands"] = [c.as_dict() for c in b.commands]
        # WELCOME goes out before any DELIVER that accept_hello makes possible.
        self.send_frame(FrameType.WELCOME, 0, fid, msgpack.packb(welcome))
        self.accept_hello(role != "producer", granted)
        if session is not None:
            disp.bind_session(self, session)
        if b._disp is not None and (b._disp.backpressure or b._stopping) and role != "consumer":
            b.hold_back(self, True)  # as _backpressure does: a pure consumer sends nothing to hold
        if granted < prefetch:
            log.info("%s %s connected from %s (prefetch %d asked, %d granted: the broker's limit)",
                     role, self.name, self.peer, prefetch, granted)
        else:
            log.info("%s %s connected from %s", role, self.name, self.peer)

    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if not self.handshaken and not self.detached:
            self.on_protocol_error(ProtocolError(
                ErrorCode.HANDSHAKE, f"no HELLO within {self.broker.handshake_timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None

    def _close_with_error(self, code: int, reason: str) -> None:
        """Send what is pending, then the ERROR frame; requeue what we held; close."""
        transport = self.transport
        if transport is None or self.detached:
            return
        self._cancel_timer()
        self.flush_now()
        transport.write(encode_frame(FrameType.ERROR, 0, 0, error_payload(code, reason)))
        self.detach()
        transport.close()


def _one_line(text: str) -> str:
    """``text`` as one line of a log: backslash, CR, LF and other controls escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii")


class InprocOwner(Protocol):
    """What an :class:`InprocClient` serves (a web gateway session): told to stop and resume
    taking what its peer sends (back-pressure), and that the broker closed the client."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def on_broker_close(self, client: InprocClient) -> None: ...


#: What an InprocClient's on_output gets: (frame type, flags, id, payload), nothing encoded.
Output = Callable[[list[tuple[int, int, int, bytes]]], object]


class InprocClient(ControlledEndpoint, InprocEndpoint):
    """A client inside the broker's process: an in-process endpoint of its dispatcher (no wire
    frames: deliveries, replies and errors reach ``on_output``, answers and sends are method
    calls) with what the control plane does for a connection: its connected, subscribed and
    disconnected lines (role and name), back-pressure (held back with the producers at the high
    mark; a ``producer``'s owner stops reading), the broker commands its sends carry, refusals,
    and the broker's shutdown. Made by :meth:`open`, ended by :meth:`close`.
    """

    owner: InprocOwner
    _paused: set[str]  # why its owner stopped reading: "queue"

    @classmethod
    def open(cls, broker: Broker, owner: InprocOwner, on_output: Output, *, role: str, name: str,
             peer: str, prefetch: int = DEFAULT_PREFETCH) -> InprocClient:
        """A client of ``role`` ("producer", "consumer" or "both"), as a connection whose HELLO
        said that role, name and prefetch (0: the default, as in a HELLO) would be."""
        disp = broker._disp
        if disp is None:
            raise RuntimeError("start the broker before its in-process clients")
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}")
        prefetch = prefetch or DEFAULT_PREFETCH
        if prefetch < 1:
            raise ValueError(f"bad prefetch {prefetch!r}")
        granted = min(prefetch, MAX_PREFETCH)
        self = cls(disp, on_output, prefetch=granted if role != "producer" else 0)
        self.broker = broker
        self.owner = owner
        self.name = name[:200]
        self.log_name = _one_line(self.name).encode("utf-8", "replace")
        self.role = role
        self.peer = peer
        self.caps = frozenset()
        self.refused_logged = (0, 0)
        self._paused = set()
        broker._conns.add(self)
        if (disp.backpressure or broker._stopping) and role != "consumer":
            broker.hold_back(self, True)  # as _backpressure does: a pure consumer sends nothing to hold
        if granted < prefetch:
            log.info("%s %s connected from %s (prefetch %d asked, %d granted: the broker's limit)",
                     role, self.name, peer, prefetch, granted)
        else:
            log.info("%s %s connected from %s", role, self.name, peer)
        return self

    def _output(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        self.put_output(ftype, flags, fid, payload)

    def pause_for(self, reason: str) -> None:
        if not self._paused and not self.detached:
            self.owner.pause_reading()
        self._paused.add(reason)

    def resume_for(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and not self.detached:
            self.owner.resume_reading()

    def close(self) -> None:
        """The client goes: what it held is requeued, its parked sends dropped. Idempotent."""
        if self.detached:
            return
        self.broker._conns.discard(self)
        self._log_gone(None)
        super().close()

    def _close_with_error(self, code: int, reason: str) -> None:
        """Hand over what is pending and the ERROR; requeue what it held; tell the owner."""
        if self.detached:
            return
        self.put_output(FrameType.ERROR, 0, 0, error_payload(code, reason))
        self.flush_now()
        self.broker._conns.discard(self)
        self._log_gone(None)
        super().close()
        self.owner.on_broker_close(self)


def _error_text(payload: bytes) -> str:
    try:
        err = msgpack.unpackb(payload, raw=False)
        return f"{err['reason']} (code {err['code']})"
    except Exception:
        return repr(payload[:200])


class Broker:
    """A teomq broker, embeddable in any asyncio program.

    Example::

        async with Broker(port=0) as broker:
            print(broker.address, broker.port)
            await broker.serve_forever()

    Args:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read it back from ``port`` after start).
        data_dir: where the broker keeps its key (its address survives restarts).
        max_payload: largest message accepted, in bytes; larger frames are refused from their header.
        queue_max: messages the broker may hold, queued or in flight (fanout copies are bounded per
            subscriber instead); a SEND beyond it gets a QUEUE_FULL error. Producers are held back
            from 3/4 of it.
        handshake_timeout: seconds a new connection has to send its HELLO.
        backlog_max: command scheme: fanout copies a subscriber without credit may have
            waiting; past that it is a slow consumer and new copies for it are dropped
            (logged, counted in ``dropped``) so that it holds up nobody else.
        log_messages: log every accepted message, as an INFO line of ``teomq.broker.messages``
            (only while that logger is enabled for INFO, checked at start).
        message_log: where those lines go: a file descriptor or a path (appended). The core
            formats them in C and writes them once per loop pass, outside Python logging (the
            CLI gives its stderr or ``-log-file``). None: through Python logging, one record
            per message (slow: a Python call and a logging record for each).
        record_address: write ``address -> host:port`` to the local address book.
        commands: the command schema (a :class:`~teomq.commands.CommandSchema` or
            :class:`~teomq.commands.Command` objects). With one, the broker runs the command
            scheme: every message must be a command of the schema (else UNKNOWN_COMMAND),
            consumers subscribe per command and each command routes by its ``routing``.
            Without one (None), the basic scheme: one queue, its consumers served in runs.
        dispatch_run: most consecutive messages of one queue a consumer takes (bounded by its
            free credit) before the next consumer with credit gets its run; 1 is a per-message
            round robin. See docs/protocol.md, "Which consumer gets a message".
        storage: ``"disk"``: queues kept in ``data_dir/queues``, an append-only log read back
            at start (docs/storage.md); ``"memory"``: lost when the process ends. None (the
            default): disk when ``data_dir`` is given, else memory.
        fsync: when the log is made durable (disk storage): ``"always"`` (each loop pass's
            records, by a thread, grouped), ``"interval:MS"`` or ``"never"``.
        segment_size: bytes a log segment file is rolled at (preallocated 1 MiB at a time).
        queue_max_bytes: bytes of the messages all queues together may have waiting (each
            message's payload as sent; 0: no bound but the disk's); past it a SEND is refused
            with QUEUE_FULL. Per command, the schema's
            ``max_messages`` and ``max_bytes`` bound what waits in its queue the same way.
        memory_max: disk storage: bytes of memory queued messages may hold; past it new ones
            are paged out (only a 20-byte index entry each stays in memory, the rest is read
            back from the log as consumers take them). Memory storage keeps every message in
            memory (bounded by ``queue_max``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        queue_max: int = 1_000_000,
        handshake_timeout: float = 10.0,
        log_messages: bool = True,
        record_address: bool = True,
        commands: CommandSchema | list[Command] | None = None,
        backlog_max: int = 10_000,
        dispatch_run: int = DEFAULT_DISPATCH_RUN,
        message_log: int | str | os.PathLike[str] | None = None,
        storage: str | None = None,
        fsync: str = "always",
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        memory_max: int = DEFAULT_MEMORY_MAX,
        queue_max_bytes: int = 0,
        lease: float = DEFAULT_LEASE,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        retry_base: float = DEFAULT_RETRY_BASE,
        retry_max: float = DEFAULT_RETRY_MAX,
        dlq_max: int = DEFAULT_DLQ_MAX,
    ) -> None:
        if not 0 < max_payload < 1 << 31:
            raise ValueError("max_payload must be between 1 and 2**31 - 1 bytes")
        if queue_max < 1:
            raise ValueError("queue_max must be at least 1")
        if backlog_max < 1:
            raise ValueError("backlog_max must be at least 1")
        if not 1 <= dispatch_run <= MAX_PREFETCH:
            raise ValueError(f"dispatch_run must be between 1 and {MAX_PREFETCH} (no credit is larger)")
        if storage is None:
            storage = "disk" if data_dir is not None else "memory"
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {', '.join(STORAGE_MODES)}, not {storage!r}")
        self.storage_mode = storage
        self.fsync = FsyncPolicy.parse(fsync)
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes")
        self.segment_size = segment_size
        if memory_max < MIN_MEMORY_MAX:
            raise ValueError(f"memory_max must be at least {MIN_MEMORY_MAX} bytes")
        self.memory_max = memory_max
        if queue_max_bytes < 0:
            raise ValueError("queue_max_bytes must be 0 (none) or a number of bytes")
        self.queue_max_bytes = queue_max_bytes
        if not 0 <= lease <= 86400:
            raise ValueError("lease must be 0 (none) to 86400 seconds")
        if not 0 <= max_deliveries <= 10000 or not 0 <= max_crashes <= 10000:
            raise ValueError("max_deliveries and max_crashes must be 0 (no limit) to 10000")
        if not 0 < retry_base <= retry_max <= 86400:
            raise ValueError("retry_base must be above 0 and at most retry_max (at most 86400 seconds)")
        if dlq_max < 1:
            raise ValueError("dlq_max must be at least 1")
        self.lease = lease
        self.max_deliveries = max_deliveries
        self.max_crashes = max_crashes
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.dlq_max = dlq_max
        self.dlq: DeadLetterQueue | None = None
        self.storage: DiskStorage | None = None
        self.backlog_max = backlog_max
        self.dispatch_run = dispatch_run
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.max_payload = max_payload
        self.queue_max = queue_max
        self.handshake_timeout = handshake_timeout
        self.log_messages = log_messages
        self.message_log = message_log
        self._msglog: MessageLog | None = None
        self._msglog_dropped = 0
        self.record_address = record_address
        if commands is not None and not isinstance(commands, CommandSchema):
            commands = CommandSchema(commands)
        self.commands: CommandSchema | None = commands
        self.identity: BrokerIdentity | None = None
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._disp: Dispatcher | None = None
        self._conns: set[BrokerConnection | InprocClient] = set()  # wire connections, in-process clients
        self._errors = 0
        self._book: AddressBook | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._stopping = False   # close() is draining: producers stay held back
        self._paging = False     # messages are paged out (logged at the edges)
        self._paged_logged = 0
        self._limit_logged = 0   # SENDs refused at queue limits: logged at most once a second
        self._limit_log_at = 0.0
        self._limit_counts: dict[str, int] = {}

    async def start(self) -> None:
        """Load (or create) the key, listen, and record the address."""
        loop = asyncio.get_running_loop()
        self.identity = BrokerIdentity.load_or_create(self.data_dir)
        self.address = self.identity.address
        self._disp = Dispatcher(max_payload=self.max_payload, queue_max=self.queue_max,
                                scheduler=loop.call_soon, backlog_max=self.backlog_max,
                                run=self.dispatch_run)
        self._disp.on_slow_consumer = self._slow_consumer
        if self.log_messages and msg_log.isEnabledFor(logging.INFO):
            if self.message_log is None:
                self._disp.on_message = self._log_message
            else:
                self._msglog = MessageLog(self.message_log)
                self._disp.outbox.set_message_log(self._msglog)  # enqueue adds, the flush writes
        self._disp.on_backpressure = self._backpressure
        self._disp.on_refused = self._refused
        if self.commands is not None:
            table = CommandTable()  # the schema's commands, then the broker's own
            kinds = []
            for c in self.commands:
                table.add(c.name, c.pattern)
                kinds.append(KINDS[c.routing])
            for name in BROKER_COMMANDS:
                table.add(name)
                kinds.append(KINDS[name])
            self._disp.set_schema(table, kinds)
            for i, c in enumerate(self.commands):
                if c.max_messages or c.max_bytes:
                    self._disp.set_limits(i, c.max_messages, c.max_bytes)
                if c.lease or c.max_deliveries or c.max_crashes or c.priority or c.ttl or c.dead_letter_expired:
                    self._disp.set_route_delivery(i, lease=c.lease, max_deliveries=c.max_deliveries,
                                                  max_crashes=c.max_crashes, priority=c.priority, ttl=c.ttl,
                                                  dead_letter_expired=c.dead_letter_expired)
        self._disp.queue_max_bytes = self.queue_max_bytes
        self._disp.set_delivery(lease=self.lease, max_deliveries=self.max_deliveries, max_crashes=self.max_crashes,
                                retry_base=self.retry_base, retry_max=self.retry_max, realtime=True)
        self._disp.on_dead = self._dead_letters
        dlq_path = self.data_dir / "dlq" / "deadletters.log" if self.storage_mode == "disk" else None
        self.dlq = DeadLetterQueue(dlq_path, self.dlq_max, sync=self.fsync.mode != "never")
        self.dlq.open()             # ValueError: not a dead-letter file; OSError: unreadable
        if self.dlq.recovery_note:
            log.warning("dead-letter queue %s: %s", dlq_path, self.dlq.recovery_note)
        elif len(self.dlq):
            log.info("dead-letter queue: %d dead letters (teomq dlq list)", len(self.dlq))
        if self.storage_mode == "disk":
            storage = DiskStorage(self.data_dir, self.fsync, segment_size=self.segment_size)
            storage.open()               # StorageError: locked by another broker, unreadable log
            self._disp.mem_max = self.memory_max
            try:
                storage.attach(self._disp, loop)
            except BaseException:
                storage.close_files()
                raise
            self.storage = storage
        disp = self._disp
        try:
            self._server = await loop.create_server(
                lambda: BrokerConnection(disp, self), self.host, self.port, reuse_address=True)
        except BaseException:
            if self.storage is not None:
                self.storage.close()
                self.storage = None
            raise
        bound = self._server.sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self._tick()  # the dispatcher's clock is the loop's, moved on by one timer
        if self.record_address:
            self._book = AddressBook()
            self._book.record(self.address, _reachable_host(self.host), self.port)
        log.info("broker %s listening on %s:%d", self.address, self.host, self.port)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self._disp is not None:
            self._disp.tick(loop.time())
            if self._disp.n_paged_out != self._paged_logged:
                self._report_paging(self._disp)
            if self._disp.n_limit_refused != self._limit_logged and loop.time() >= self._limit_log_at:
                self._report_limits(self._disp, loop.time())
        if self._msglog is not None and self._msglog.dropped != self._msglog_dropped:
            self._report_msglog()
        self._ticker = loop.call_later(TICK_INTERVAL, self._tick)

    # -- the dead-letter queue (docs/semantics.md) -------------------------------------------

    def _dead_letters(self, docs: list[dict[str, Any]]) -> None:
        """The core's dead letters of a pass: stored (synced) before their messages leave their
        queues; raising keeps them there, live, to be tried again a second later."""
        dlq = cast(DeadLetterQueue, self.dlq)
        now = time.time()
        letters = [DeadLetter(id=0, route=d["route"], payload=d["payload"], reason=d["reason"], detail=d["detail"],
                              attempts=d["attempts"], nacks=d["nacks"], crashes=d["crashes"],
                              consumers=list(d["consumers"]), errors=list(d["errors"]), producer=d["producer"],
                              msg_id=d["msg_id"], accepted_at=0.0, dead_at=now) for d in docs]
        try:
            evicted = dlq.add(letters)
        except OSError as exc:
            log.error("dead-letter queue: cannot store %d dead letters (%s): they stay in their queues, tried "
                      "again in a second", len(letters), exc)
            raise
        for dl in letters:
            where = f"'{dl.route}'" if dl.route else "the queue"
            log.warning("message #%d of %s (from %s) dead-lettered as %d: %s after %d deliveries (%d failed, "
                        "%d crashed)%s", dl.msg_id, where, dl.producer or "?", dl.id, dl.reason, dl.attempts,
                        dl.nacks, dl.crashes, f": {dl.detail[:200]}" if dl.detail else "")
        if evicted:
            log.warning("dead-letter queue: past -dlq-max %d, the %d oldest dead letters were dropped (%d so far)",
                        self.dlq_max, evicted, dlq.n_evicted)

    def _dlq_command(self, ep: ControlledEndpoint, fid: int, flags: int, data: bytes) -> None:
        """API command 131 (``teomq dlq``): msgpack {"op": list|show|replay|purge, ...}, answered
        with msgpack. Permissions come with the security work: any client may call it."""
        dlq = cast(DeadLetterQueue, self.dlq)
        try:
            req = msgpack.unpackb(data) if data else None
        except Exception:
            req = None
        if not isinstance(req, dict) or req.get("op") not in ("list", "show", "replay", "purge"):
            ep._refuse(fid, ErrorCode.NOT_ALLOWED, "dlq: the request is msgpack {\"op\": list|show|replay|purge, ...}")
            return
        op = req["op"]
        try:
            if op == "list":
                offset = max(0, int(req.get("offset", 0)))
                limit = min(DLQ_LIST_MAX, max(1, int(req.get("limit", 100))))
                answer: dict[str, Any] = {"total": len(dlq), "evicted": dlq.n_evicted,
                                          "letters": [dl.summary() for dl in dlq.list(offset, limit)]}
            elif op == "show":
                dl = dlq.get(int(req.get("id", -1)))
                if dl is None:
                    ep._refuse(fid, ErrorCode.NOT_ALLOWED, f"dlq show: no dead letter {req.get('id')!r}")
                    return
                answer = {"letter": dl.to_doc()}
            else:
                ids = dlq.ids() if req.get("all") else [int(i) for i in req.get("ids", [])]
                answer = self._dlq_replay(ids) if op == "replay" else {"purged": len(dlq.remove(ids))}
                log.info("dlq %s by %s %s: %s", op, ep.role, ep.name, answer)
        except (TypeError, ValueError) as exc:
            ep._refuse(fid, ErrorCode.NOT_ALLOWED, f"dlq {op}: {exc}")
            return
        except OSError as exc:
            ep._refuse(fid, ErrorCode.STORAGE, f"dlq {op}: the dead-letter queue cannot be written: {exc}")
            return
        ep._reply(fid, flags, msgpack.packb(answer))

    def _dlq_replay(self, ids: list[int]) -> dict[str, Any]:
        # each back in its queue as a new message (no producer waits for it), then out of the
        # dead-letter queue: written to the log first (a crash between: in both, never neither)
        disp = cast(Dispatcher, self._disp)
        dlq = cast(DeadLetterQueue, self.dlq)
        done: list[int] = []
        failed: dict[int, str] = {}
        for i in ids:
            dl = dlq.get(i)
            if dl is None:
                failed[i] = "no such dead letter"
                continue
            if self.commands is None:
                idx = 0 if dl.route == "" else -1
            else:
                idx = next((k for k, c in enumerate(self.commands) if c.name == dl.route), -1)
            if idx < 0:
                failed[i] = f"this broker has no queue '{dl.route}'"
            elif disp.replay(idx, dl.payload):
                done.append(i)
            else:
                failed[i] = "its queue is full, or the log refuses new messages now"
        if done:
            disp.flush()           # the pass's records written, and synced, before they leave the
            if self.storage is not None:   # dead-letter queue: a crash between leaves them in both
                self.storage.sync_now()
            dlq.remove(done)
        return {"replayed": len(done), "failed": {str(k): v for k, v in failed.items()}}

    def _report_paging(self, disp: Dispatcher) -> None:
        # the edges: messages begin to be paged out / every one is read back
        out = disp.n_paged_out - disp.n_paged_in + disp.n_delayed_out   # (delayed ones kept on disk too)
        if out and not self._paging:
            self._paging = True
            log.info("queues: the memory budget is spent (-memory-max %d bytes, %d in use): new messages are paged "
                     "out to the log, %d so far", self.memory_max, disp.mem_queued, out)
        elif not out and self._paging:
            self._paging = False
            self._paged_logged = disp.n_paged_out
            log.info("queues: every paged-out message is read back (%d paged out since the start)", disp.n_paged_out)

    def _report_limits(self, disp: Dispatcher, now: float) -> None:
        # SENDs refused at a queue's limit: one line per queue, at most once a second
        self._limit_logged = disp.n_limit_refused
        self._limit_log_at = now + REFUSAL_LOG_INTERVAL
        counts = [(r["name"], r["refused"]) for r in disp.route_stats()] or [(b"", disp.n_limit_refused)]
        for raw, refused in counts:
            name = raw.decode("utf-8", "replace") or "the queue"
            new = refused - self._limit_counts.get(name, 0)
            if new:
                self._limit_counts[name] = refused
                log.warning("%d message%s refused: '%s' is at its limit (%s)", new, "" if new == 1 else "s", name,
                            self._limit_text(name))

    def _limit_text(self, name: str) -> str:
        c = next((c for c in self.commands or () if c.name == name), None)
        parts = []
        if c is not None and c.max_messages:
            parts.append(f"max_messages {c.max_messages}")
        if c is not None and c.max_bytes:
            parts.append(f"max_bytes {c.max_bytes}")
        if self.queue_max_bytes:
            parts.append(f"-queue-max-bytes {self.queue_max_bytes}")
        return ", ".join(parts)

    def _report_msglog(self) -> None:
        m = cast(MessageLog, self._msglog)
        lost, self._msglog_dropped = m.dropped - self._msglog_dropped, m.dropped
        why = os.strerror(m.last_errno) if m.last_errno else "its output does not keep up"
        log.warning("%d message log line%s lost (%s); %d lost in all", lost, "" if lost == 1 else "s", why,
                    m.dropped)

    async def serve_forever(self) -> None:
        """Serve until close() is called or the task is cancelled."""
        if self._server is None:
            await self.start()
        server = self._server
        assert server is not None
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            if self._server is not None:  # cancelled from outside, not by close()
                raise

    async def drain(self, timeout: float) -> int:
        """The first half of a graceful stop: stop listening, take no new messages (producers are
        held back: their sends park, never accepted), make no new deliveries, and wait up to
        ``timeout`` seconds while the answers to what consumers hold are still relayed. Returns
        how many messages are still in flight. Cancel it to stop waiting; then :meth:`close`."""
        disp = self._disp
        if self._server is None or disp is None:
            return 0
        self._server.close()
        self._stopping = True
        disp.paused = True
        for conn in list(self._conns):
            if conn.handshaken and conn.role != "consumer":
                self.hold_back(conn, True)
        inflight = disp.stats()["inflight"]
        before = disp.n_answered
        log.info("broker stopping: new messages and deliveries stopped; waiting up to %g s for the answers to "
                 "%d messages in flight", timeout, inflight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while disp.stats()["inflight"] and loop.time() < deadline:
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        finally:
            left = disp.stats()["inflight"]
            log.info("broker stopping: %d of %d messages in flight answered; %d still in flight go back to their "
                     "queues", disp.n_answered - before, inflight, left)
        return int(left)

    async def close(self, grace: float = 0.0) -> None:
        """Stop listening, tell every client, close every connection and the storage (synced).
        With ``grace`` > 0, :meth:`drain` for up to that many seconds first. What consumers
        still hold goes back to its queue: kept on disk with disk storage, lost with memory
        storage (logged). Idempotent."""
        if self._server is None:
            return
        if grace > 0:
            await self.drain(grace)
        server, self._server = self._server, None
        server.close()
        disp = self._disp
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if disp is not None:
            disp.paused = True     # what consumers hold goes back uncounted: not their failure
        for conn in list(self._conns):
            conn._close_with_error(ErrorCode.SHUTDOWN, "broker is shutting down")
        await server.wait_closed()
        if self.dlq is not None:
            self.dlq.close()
        if self.storage is not None:
            self.storage.close()
        elif disp is not None and disp.stats()["queue"]:
            log.warning("broker stopping: %d queued messages are lost (-storage memory)", disp.stats()["queue"])
        if self._msglog is not None:
            self._msglog.close()
            if self._msglog.dropped != self._msglog_dropped:
                self._report_msglog()
        if self._book is not None:
            self._book.forget(self.address, pid=os.getpid())
        log.info("broker %s stopped", self.address)

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        """Counters: in, out, answered, redelivered, queue, inflight, consumers, connections, errors..."""
        s = self._disp.stats() if self._disp is not None else {}
        s["errors"] = self._errors
        return s

    def command_stats(self) -> list[dict[str, Any]]:
        """Per command of the schema: name, routing, queued, subscribers, in, out."""
        if self._disp is None:
            return []
        return [dict(r, name=r["name"].decode("utf-8", "replace")) for r in self._disp.route_stats()]

    def _backpressure(self, on: bool) -> None:
        # Queued plus in-flight messages reached the high mark (or are back at the low one).
        if self._stopping:
            return  # close() holds every producer back until it is done
        conns = [c for c in self._conns if c.handshaken and c.role != "consumer"]
        s = self._disp.stats() if self._disp is not None else {"held": 0, "queue": 0}
        if on:
            log.info("%d messages held, queued or in flight (high mark): holding back %d producers",
                     s["held"], len(conns))
        else:
            log.info("%d messages held, %d of them queued (low mark, or the queues down to it with half "
                     "the bound free): resuming %d producers", s["held"], s["queue"], len(conns))
        for conn in conns:
            self.hold_back(conn, on)

    @staticmethod
    def hold_back(conn: BrokerConnection | InprocClient, on: bool) -> None:
        """Hold back (or let go) one producing connection (or in-process client) under back-pressure."""
        # The rest of the read that crossed the high mark is parked too, not refused.
        conn.hold(on)
        if conn.role == "producer":  # nothing to keep reading for: TCP back-pressure as well
            if on:
                conn.pause_for("queue")
            else:
                conn.resume_for("queue")

    def _refused(self) -> None:
        """The core refused a SEND (QUEUE_FULL): log it now, then at most once per interval."""
        self._log_refusals()
        asyncio.get_running_loop().call_later(REFUSAL_LOG_INTERVAL, self._refusal_interval_end)

    def _refusal_interval_end(self) -> None:
        if self._disp is None:
            return
        self._log_refusals()
        self._disp.refusal_noted = False  # the next refusal logs at once again

    def _log_refusals(self, *conns: ControlledEndpoint) -> None:
        held = self._disp.stats()["held"] if self._disp is not None else 0
        for conn in conns or self._conns:
            full, parked = conn.n_refused - conn.refused_logged[0], conn.n_refused_parked - conn.refused_logged[1]
            conn.refused_logged = (conn.n_refused, conn.n_refused_parked)
            if full:
                log.warning("%s %s (%s): %d message%s refused: queue is full (%d held of -queue-max %d)",
                            conn.role, conn.name, conn.peer, full, "" if full == 1 else "s", held,
                            self.queue_max)
            if parked:
                log.warning("%s %s (%s): %d message%s refused: held back, and its parked messages reached "
                            "their bound (%d held of -queue-max %d)", conn.role, conn.name, conn.peer,
                            parked, "" if parked == 1 else "s", held, self.queue_max)

    def _slow_consumer(self, conn: ControlledEndpoint, command: bytes) -> None:
        log.warning("%s %s (%s) is slow: %d fanout copies wait for it (the -backlog-max); new copies of "
                    "'%s' and its other fanout commands are dropped for it until it catches up",
                    conn.role, conn.name, conn.peer, self.backlog_max, command.decode("utf-8", "replace"))

    def _log_message(self, conn: ControlledEndpoint, msg_id: int, payload: bytes) -> None:
        msg_log.info("message #%d from %s: %s", msg_id, conn.name,
                     payload[:256].decode("utf-8", "replace"))


def _reachable_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
