"""One client connection to a teomq broker: the asyncio protocol under :mod:`teomq.client`.

One TCP connection per client. The read path hands each socket read to the C
``ClientCore`` once: it resolves every REPLY (Future or send() callback) and runs a
synchronous consumer handler for every DELIVER in C, and passes only the rare frames up
to Python. The write path encodes frames into the core's ``WriteBuffer`` and writes it
with one ``transport.write`` per event-loop pass.

Wire exchange (docs/protocol.md is the full spec)::

    client -> HELLO   {"v": 1, "role", "name", "prefetch", "nonce": 16 bytes, "auth": None,
                       "commands": True (producing roles: send the command schema)}
    broker -> WELCOME {"v": 1, "address", "pubkey", "sig", "max_payload", "server", "scheme",
                       "commands" (when asked)}
    client -> SEND    id = client's message id (1, 2, ...), flags NO_REPLY for publish()
    broker -> REPLY   id = that message id, payload = the consumer's answer
    broker -> DELIVER id = delivery id, flags REDELIVERED          (consumers)
    client -> ANSWER  id = that delivery id, flags NO_ANSWER if no answer (consumers)
    broker -> ERROR   id = related message id, or 0: fatal, the broker closes the connection
    broker -> PING    client -> PONG with the same id
    broker -> FLOW    flags HOLD: hold SENDs back; flags 0: go on    (clients with caps ["flow"])

Design notes:

- Writes: ``_write`` encodes a frame into the connection's WriteBuffer and, once per loop
  pass, schedules ``_flush`` with ``call_soon``; every request, publish, ANSWER and PONG
  made in that pass leaves in one ``transport.write``. Sync handlers run inline in
  ``data_received``, so all answers to one socket read go out together.
- Timeouts: no TimerHandle per request and no clock read per request. Requests with the
  client's default timeout are kept in the core's ring, indexed by message id (ids
  increase, so id order is also send order). One tick, every ``_TICK`` seconds while
  anything is pending, closes a bucket ``[now + timeout, highest id sent so far]``:
  every id in it was sent at or before ``now``, so its deadline is never early. Due
  buckets are expired with one ``expire_upto`` call. Other timeouts go into a small heap
  checked by the same tick. A request times out at most ~2 ticks late, never early.
  Answers arriving after that are dropped.
- Fanout answers: :meth:`Client.collect` keeps a :class:`Collector` in the custom-timeout
  table; every REPLY with its id is added to it (not popped) until its timeout or ``expect``.
- Flow control: two things hold a producing client back: ``pause_writing`` (the broker
  reads slower than we write), and a FLOW frame with HOLD (the broker holds as many
  messages as its high mark). While held by FLOW, SENDs and PINGs wait in ``_deferred``,
  in order, and go out when FLOW without HOLD comes; answers go on (a client that also
  consumes frees the room it waits for). Either makes :meth:`Client.request` wait before
  sending and :meth:`Client.drain` wait in ``send``/``publish`` loops. Unsent answers are
  bounded by the prefetch credit.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import math
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, cast

import msgpack

from teomq._core.client_core import ClientCore
from teomq._core.frame_codec import encode_frame
from teomq.commands import Command
from teomq.errors import (
    AddressError,
    BrokerError,
    ConnectionLost,
    DeadLettered,
    Expired,
    NoConsumer,
    ProtocolError,
    QueueFull,
    QueueFullError,
    Reject,
    Rejected,
    RequestTimeout,
    Retry,
    StorageError,
)
from teomq.identity import verify_welcome
from teomq.protocol import FLOW_HOLD, MAX_PAYLOAD_LIMIT, ErrorCode, Flag, FrameType
from teomq.transports import socket_writer

if TYPE_CHECKING:
    from teomq.client import Client

__all__ = ["Connection", "Collector", "to_payload"]

log = logging.getLogger("teomq.client")
consumer_log = logging.getLogger("teomq.consumer")

_WELCOME = int(FrameType.WELCOME)
_DELIVER = int(FrameType.DELIVER)
_REPLY = int(FrameType.REPLY)
_ERROR = int(FrameType.ERROR)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_SEND = int(FrameType.SEND)
_ANSWER = int(FrameType.ANSWER)
_FLOW = int(FrameType.FLOW)
_CONFIRM = int(FrameType.CONFIRM)
_TOUCH = int(FrameType.TOUCH)
_CANCEL = int(FrameType.CANCEL)
_DEADLINE = int(Flag.DEADLINE)
_DELAY = int(Flag.DELAY)
_RETRY = int(Flag.RETRY)
_REJECT = int(Flag.REJECT)
_NO_REPLY = int(Flag.NO_REPLY)
_NO_ANSWER = int(Flag.NO_ANSWER)
_REDELIVERED = int(Flag.REDELIVERED)
_API = int(Flag.API)

#: Period of the timeout tick (seconds): requests time out at most about two ticks late.
_TICK = 0.05
#: More bytes than this before the WELCOME is a bad broker (a WELCOME carrying a command
#: schema of 100,000 commands is about 5 MB).
_HANDSHAKE_LIMIT = 8 << 20
#: Seconds between log lines about messages the broker refused (the first is logged at once).
_REFUSAL_LOG_INTERVAL = 1.0
#: ERROR codes that refuse a SEND (it was not accepted)
_REFUSALS = frozenset({int(ErrorCode.QUEUE_FULL), int(ErrorCode.UNKNOWN_COMMAND), int(ErrorCode.NOT_ALLOWED),
                       int(ErrorCode.STORAGE), int(ErrorCode.NO_CONSUMER)})
#: Seconds past a request's deadline (its timeout) the client waits for the broker's word
#: (EXPIRED, or the answer of a consumer that took it in time) before it raises Expired itself.
DEADLINE_GRACE = 0.5
#: A consumer's handler limit by default (Consumer(max_handler_time=...)): past it the lease is
#: no longer extended, the handler is cancelled and the message goes to another consumer.
DEFAULT_MAX_HANDLER_TIME = 600.0
#: ERROR codes about one of our ANSWERs (its id is a delivery id)
_ANSWER_ERRORS = frozenset({int(ErrorCode.UNKNOWN_ID), int(ErrorCode.LEASE_EXPIRED)})
#: ERROR codes about an accepted request (not refusals): late ones are not logged as refusals
_LATE_WORD = frozenset({int(ErrorCode.EXPIRED), int(ErrorCode.DEAD_LETTERED), int(ErrorCode.REJECTED)})
_TYPED = {int(ErrorCode.DEAD_LETTERED): DeadLettered, int(ErrorCode.REJECTED): Rejected,
          int(ErrorCode.NO_CONSUMER): NoConsumer}


def _typed_refusal(err: BrokerError, errno: int, *, confirmation: bool) -> BaseException:
    """What the caller of a refused or failed SEND gets: StorageError (retryable) for STORAGE;
    for QUEUE_FULL a QueueFull (a Confirmation's) or QueueFullError (a request's: also the
    BrokerError); Expired, DeadLettered, Rejected, NoConsumer for theirs; else the BrokerError."""
    if err.code == ErrorCode.STORAGE:
        return StorageError(err.reason, errno)
    if err.code == ErrorCode.QUEUE_FULL:
        return QueueFull(str(err)) if confirmation else QueueFullError(err.code, err.reason)
    if err.code == ErrorCode.EXPIRED:
        return Expired(err.reason, err.code)
    typed = _TYPED.get(err.code)
    if typed is not None:
        return typed(err.code, err.reason)
    return err


def _deadline_ms(seconds: float) -> int:
    """A request's deadline as SEND flag DEADLINE carries it: whole ms, 0 to 2^32 - 1."""
    return int(min(max(0.0, seconds) * 1000, 0xFFFFFFFF))


def _deadline_prefix(seconds: float) -> bytes:
    """The u32 (little-endian) that begins a SEND flagged DEADLINE."""
    return _deadline_ms(seconds).to_bytes(4, "little")


def _shift_prefix(flags: int, payload: bytes, gone_ms: float, deadline_left: float | None) -> bytes:
    """A SEND's deadline and delay prefix (docs/protocol.md) ``gone_ms`` after it was made (it
    waited in the client: held back by FLOW, or buffered while reconnecting): the delay less the
    whole ms gone (never early), the deadline less every ms begun (never longer), or
    ``deadline_left`` seconds when given (a request's: its timeout's)."""
    head = b""
    off = 0
    if flags & _DEADLINE:
        if deadline_left is not None:
            head = _deadline_prefix(deadline_left)
        else:
            head = max(0, int.from_bytes(payload[:4], "little") - math.ceil(gone_ms)).to_bytes(4, "little")
        off = 4
    if flags & _DELAY:
        head += max(0, int.from_bytes(payload[off:off + 4], "little") - int(gone_ms)).to_bytes(4, "little")
        off += 4
    return head + payload[off:]


class DeliveryContext:
    """What a consumer's handler gets as its second parameter, if it declares one.

    ``attempt``: this delivery's number (1 for the first; from a broker that speaks "lease",
    else 1 or 2 by ``redelivered``); ``redelivered``: an earlier delivery was not answered;
    ``delivery_id``; ``cancelled``: its producer withdrew the request (CANCEL): nobody waits
    for the answer; ``remaining()``: seconds left of the handler limit (``max_handler_time``).
    """

    __slots__ = ("delivery_id", "attempt", "redelivered", "cancelled", "_until", "_loop", "_event")

    def __init__(self, did: int, flags: int, until: float, loop: asyncio.AbstractEventLoop) -> None:
        self.delivery_id = did
        self.redelivered = bool(flags & _REDELIVERED)
        self.attempt = (flags >> 8) or (2 if self.redelivered else 1)
        self.cancelled = False
        self._until = until
        self._loop = loop
        self._event: asyncio.Event | None = None

    def remaining(self) -> float:
        return max(0.0, self._until - self._loop.time())

    async def wait_cancelled(self) -> None:
        """Return once its producer cancels the request."""
        if self.cancelled:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def _cancel(self) -> None:
        self.cancelled = True
        if self._event is not None:
            self._event.set()

    def __repr__(self) -> str:
        return (f"<DeliveryContext {self.delivery_id} attempt {self.attempt}"
                f"{' cancelled' if self.cancelled else ''}>")


def to_payload(data: object) -> bytes | bytearray | memoryview:
    """Normalise a payload for the codec (contiguous unsigned bytes); TypeError otherwise."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, memoryview):
        return data.cast("B") if data.c_contiguous else data.tobytes()
    raise TypeError(f"payload must be bytes, bytearray, memoryview or str, not {type(data).__name__}")


class Collector:
    """A request whose answers are all collected until its timeout (fanout commands).

    Lives in the connection's custom-timeout table: each REPLY with its id is added, the
    timeout ends it with what came, an ERROR fails it. Called like a send() callback.
    """

    __slots__ = ("future", "answers", "on_answer", "expect")

    def __init__(self, future: asyncio.Future[list[bytes]], on_answer: Callable[[bytes], object] | None,
                 expect: int | None) -> None:
        self.future = future
        self.answers: list[bytes] = []
        self.on_answer = on_answer
        self.expect = expect

    def add(self, answer: bytes) -> bool:
        """Take one answer; True when the expected number has come (the collection ends)."""
        self.answers.append(answer)
        if self.on_answer is not None:
            try:
                self.on_answer(answer)
            except Exception:
                log.exception("collect() on_answer callback raised")
        return self.expect is not None and len(self.answers) >= self.expect

    def __call__(self, mid: int, data: bytes | None, err: BaseException | None) -> None:
        if self.future.done():
            return
        if err is None or isinstance(err, RequestTimeout):
            self.future.set_result(self.answers)
        else:
            self.future.set_exception(err)


class Confirmation:
    """What :meth:`Client.publish` returns: await it for the broker's word that the message is
    stored by its fsync policy (``-fsync always``: after ``fdatasync``; ``-storage memory``: once
    accepted). Not awaiting it loses nothing: no task, and no future until it is awaited.

    Awaiting raises :class:`~teomq.errors.QueueFull`, :class:`~teomq.errors.StorageError` (the
    broker cannot store messages now: a disk error; send it again later) or
    :class:`~teomq.errors.BrokerError` when the broker refused the message, :class:`~teomq.errors.ConnectionLost` when the
    connection closed before the confirmation came (the message may or may not be stored).
    Against a broker without confirmations (no ``confirm`` capability) it resolves at once.
    """

    __slots__ = ("_conn", "id", "_state", "_fut")

    def __init__(self, conn: Connection | None, mid: int) -> None:
        self._conn = conn
        self.id = mid
        #: None while waiting, True once confirmed, else why it never will be
        self._state: bool | BaseException | None = True if conn is None else None
        self._fut: asyncio.Future[None] | None = None

    def done(self) -> bool:
        """No longer waiting: confirmed, refused, or its connection lost."""
        return self._state is not None

    @property
    def confirmed(self) -> bool:
        """The broker confirmed it stored (always True against a broker without confirmations)."""
        return self._state is True

    def __await__(self) -> Generator[Any, None, None]:
        if self._state is None:
            if self._fut is None:
                assert self._conn is not None
                self._fut = self._conn._loop.create_future()
            yield from self._fut.__await__()
        elif isinstance(self._state, BaseException):
            raise self._state

    def __repr__(self) -> str:
        state = "confirmed" if self._state is True else "waiting" if self._state is None else "ended unconfirmed"
        return f"<Confirmation of message {self.id}: {state}>"


class Connection(asyncio.Protocol):
    """One connection to a broker: handshake, framing, pending requests, consumer dispatch."""

    def __init__(self, client: Client, expected: str | None, endpoint: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._endpoint = endpoint
        self._expected = expected
        self._nonce = os.urandom(16)
        self._transport: asyncio.Transport | None = None
        self._closing = False  # transport.close() called, or connection lost
        self._by_user = False
        self._reason = "connection to broker lost"
        self._cause: BaseException | None = None
        # Permissive until WELCOME says the broker's limit (see _on_welcome).
        self._core = ClientCore(MAX_PAYLOAD_LIMIT, self._on_frame, self._on_result,
                                self._on_callback_error)
        self._wbuf = self._core.wbuf
        self._core.set_scheduling(self._loop.call_soon, self._flush, self._arm_timer)
        self.welcome: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.address: str | None = None
        self.server: str | None = None
        self.commands: list[Command] | None = None
        self.scheme = "basic"
        self.max_send = 0
        self.stats = client._counts
        self._folded = False  # core counters added to the client's (connection ended)
        # producer side: default-timeout requests live in the core's ring
        self._timeout = client._timeout
        self._buckets: deque[tuple[float, int]] = deque()  # (deadline, last id), deadline-ordered
        self._bucket_last = 0  # highest id already in a bucket
        self._custom: dict[int, Any] = {}  # any other timeout
        self._heap: list[tuple[float, int, float]] = []  # (deadline, id, timeout)
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False  # the transport is above its high mark
        self._held = False  # the broker sent FLOW with HOLD
        self._deferred: list[tuple[int, int, int, bytes]] = []  # SENDs, PINGs, CANCELs made while held
        self._deferred_due: dict[int, float] = {}  # a deferred SEND's deadline (loop time), by id
        self._deferred_at: dict[int, float] = {}  # when a deferred SEND with a deadline or delay was made
        self._resume: asyncio.Future[None] | None = None
        self._refusals_unlogged = 0
        self._refusal_timer: asyncio.TimerHandle | None = None
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._next_ping = 1
        # publish() confirmations (the broker's "confirm" capability): the Confirmations of
        # SENDs flagged CONFIRM not yet confirmed, in send order
        self.confirms = False
        self._unconfirmed: deque[Confirmation] = deque()
        self._drained: list[tuple[int, asyncio.Future[None]]] = []   # confirmed(): (target count, future)
        # consumer side
        self._handler = client._handler
        self._handler_async = client._handler_async
        self._prefetch = client._prefetch
        self._tasks: dict[asyncio.Future[Any], int] = {}
        self._backlog: deque[tuple[int, int, bytes]] = deque()
        self._wants_context = client._wants_context  # the handler takes (data, DeliveryContext)
        self._max_handler_time = client._max_handler_time
        self._running: dict[int, tuple[float, DeliveryContext | None, asyncio.Future[Any] | None]] = {}
        self._touch_timer: asyncio.TimerHandle | None = None
        self.lease = 0.0  # the broker's shortest lease (WELCOME), 0: none
        self.leases = self.deadlines = self.cancels = False  # the broker speaks "lease", "deadline", "cancel"
        self.priorities = self.delays = False  # ... "priority", "delay"
        self._grace = 0.0  # past a request's deadline: DEADLINE_GRACE once the broker takes deadlines

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        # the HELLO below goes through the transport: the writer asks it once before going around it
        self._core.set_writer(socket_writer(transport, backlog=True))  # None past TLS or a wrapping transport
        c = self._client
        hello = {"v": 1, "role": c._role, "name": c.name, "prefetch": c._prefetch,
                 "nonce": self._nonce, "auth": None,
                 "caps": ["flow", "confirm", "lease", "deadline", "cancel", "priority", "delay"], "session": c.session}
        if c._produces:  # only a producer needs to know which commands fan out
            hello["commands"] = True
        transport.write(encode_frame(int(FrameType.HELLO), 0, 0, msgpack.packb(hello)))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        # One crossing into C per read: REPLYs and sync-handler DELIVERs are handled there;
        # the rest comes back through _on_frame / _on_result.
        core = self._core
        try:
            core.feed(data)
        except ProtocolError as exc:
            self._fail(f"bad frame from broker: {exc.reason}", exc, error_code=exc.code)
            return
        if self._closing:
            return
        if len(self._wbuf) and not self._core.flush_scheduled:
            self._core.flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self.address is None and core.buffered > _HANDSHAKE_LIMIT:
            self._fail("broker sent an oversized frame before WELCOME", None,
                       error_code=ErrorCode.TOO_LARGE)

    def _on_frame(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        """A frame the core leaves to Python."""
        if self._closing:
            return
        if ftype == _REPLY:
            entry = self._custom.get(fid) if self._custom else None
            if entry is not None:  # else: late answer after a timeout, or publish(): dropped
                self.stats["replies"] += 1
                if type(entry) is Collector:
                    if entry.add(payload):
                        del self._custom[fid]
                        entry(fid, None, None)
                else:
                    del self._custom[fid]
                    self._complete(fid, entry, payload, None)
        elif ftype == _DELIVER and self.address is not None:
            self._on_deliver(flags, fid, payload)
        elif ftype == _ERROR:
            self._on_error(fid, payload)
        elif ftype == _PING:
            self._write(_PONG, 0, fid, b"")
        elif ftype == _PONG and self.address is not None:
            fut = self._pings.pop(fid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif ftype == _CONFIRM and self.address is not None:
            self._on_confirm(fid, payload)
        elif ftype == _CANCEL and self.address is not None:
            running = self._running.get(fid)
            if running is not None and running[1] is not None:
                running[1]._cancel()
        elif ftype == _FLOW and self.address is not None:
            self._held = bool(flags & FLOW_HOLD)
            self._sync_fast()
            log.debug("broker %s: %s", "holds us back" if self._held else "lets us go on", self._endpoint)
            if self._held:
                self.stats["held_back"] += 1
            elif self._deferred:
                self._release_deferred()
            self._maybe_resume()
        elif ftype == _WELCOME and self.address is None:
            self._on_welcome(payload)
        elif ftype != _PONG or self.address is None:
            name = FrameType(ftype).name
            self._fail(f"broker sent an unexpected {name} frame", None,
                       error_code=ErrorCode.NOT_ALLOWED)

    @staticmethod
    def _on_callback_error(mid: int, exc: BaseException) -> None:
        log.error("send() callback for message %d raised", mid, exc_info=exc)

    def fold_counts(self, into: dict[str, int]) -> None:
        """Add the core's counters to ``into`` (a snapshot, or the client's totals at the end)."""
        core = self._core
        into["sent"] += core.sent
        into["replies"] += core.replies
        into["received"] += core.received
        into["answered"] += core.answered
        into["redelivered"] += core.redelivered

    @property
    def paused(self) -> bool:
        """Producing is held back: by the transport (high mark) or by the broker (FLOW)."""
        return self._write_paused or self._held

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self.paused:
            return
        if self._resume is not None:
            if not self._resume.done():
                self._resume.set_result(None)
            self._resume = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._core.fast = False
        self._transport = None
        self._core.handler = None
        if not self._folded:
            self._folded = True
            self.fold_counts(self.stats)
        if exc is not None and self._cause is None:
            self._reason = f"connection to broker lost: {exc}"
            self._cause = exc
        self._client._lost_connection(self)   # it reconnects (before what was pending fails; it logs)
        if self.address is not None and not self._by_user and not self._client.reconnecting:
            log.warning("%s (%s)", self._reason, self._endpoint)
        if not self.welcome.done():  # connect() raises it
            if isinstance(self._cause, (AddressError, BrokerError)):
                self.welcome.set_exception(self._cause)
            else:
                self.welcome.set_exception(self._lost())
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)  # drain() sees _closing and raises ConnectionLost itself
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(self._lost())
        self._pings.clear()
        lost = self._lost()
        for c in self._unconfirmed:
            c._state = lost
            if c._fut is not None and not c._fut.done():
                c._fut.set_exception(lost)
        self._unconfirmed.clear()
        for _, fut in self._drained:
            if not fut.done():
                fut.set_exception(self._lost())
        self._drained.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._core.timer_armed = False
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._log_refusals()
        unsent = sum(1 for f in self._deferred if f[0] == _SEND and f[1] & _NO_REPLY)
        if unsent:
            log.warning("%d publish()ed messages held back by the broker were never sent (%s)", unsent,
                        self._endpoint)
        self._deferred.clear()
        self._deferred_due.clear()
        self._deferred_at.clear()
        pending = self._core.take_all() + list(self._custom.items())
        self._custom.clear()
        self._buckets.clear()
        self._heap.clear()
        self._backlog.clear()
        for task in list(self._tasks):
            task.cancel()  # its answer could not be sent; the broker redelivers the message
        self._running.clear()
        if self._touch_timer is not None:
            self._touch_timer.cancel()
            self._touch_timer = None
        for mid, entry in pending:
            self._complete(mid, entry, None, self._lost())
        self.closed.set_result(None)

    # -- output --------------------------------------------------------------------------

    def _write(self, ftype: int, flags: int, fid: int, payload: Any) -> None:
        """Encode one frame; it goes out with this loop pass's single write."""
        if self._held and (ftype == _SEND or ftype == _PING or ftype == _CANCEL):
            # held back by the broker: SENDs wait here (answers do not), and a PING after them
            # stays after them, so its PONG still means "everything before it was handled"
            self._deferred.append((ftype, flags, fid, payload if type(payload) is bytes else bytes(payload)))
            if ftype == _SEND and flags & (_DEADLINE | _DELAY):
                self._deferred_at[fid] = self._loop.time()   # they count from now (_rebased)
            return
        self._wbuf.add(ftype, flags, fid, payload)
        if not self._core.flush_scheduled:
            self._core.flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._core.flush_scheduled = False
        if self._closing:
            self._wbuf.take()
        else:
            self._core.write_out(cast(asyncio.Transport, self._transport))  # set while not closing

    def _release_deferred(self) -> None:
        """The broker let us go on: what was made while held goes out, in order, this pass."""
        deferred, self._deferred = self._deferred, []
        add = self._wbuf.add
        now = self._loop.time()
        for ftype, flags, fid, payload in deferred:
            if flags & (_DEADLINE | _DELAY) and ftype == _SEND:
                payload = self._rebased(flags, fid, payload, now)
            add(ftype, flags, fid, payload)
        if not self._core.flush_scheduled:
            self._core.flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _rebased(self, flags: int, fid: int, payload: bytes, now: float) -> bytes:
        """A held-back SEND's deadline and delay prefix as they are now: both count from when
        it was made, not from when the broker let it go; a request's deadline is its
        timeout's (_deferred_due)."""
        gone = max(0.0, now - self._deferred_at.pop(fid, now)) * 1000.0
        due = self._deferred_due.pop(fid, None)
        return _shift_prefix(flags, payload, gone, None if due is None else due - now)

    def _fail(self, reason: str, cause: BaseException | None, error_code: int = 0) -> None:
        """Close the connection for a fatal reason; pending requests get ConnectionLost."""
        if self._closing:
            return
        self._reason = reason
        self._cause = cause
        if error_code:
            self._write(_ERROR, 0, 0, msgpack.packb({"code": int(error_code), "reason": reason}))
        self._flush()
        self._closing = True
        self._core.fast = False
        self._core.poison(ConnectionLost(reason))
        self._transport.close()  # type: ignore[union-attr]

    def _sync_fast(self) -> None:
        """Whether Client.send/request may take the core's fast path (ClientCore.send)."""
        self._core.fast = (self.address is not None and not self._closing and not self._held
                           and self._client._produces)

    def _arm_timer(self) -> None:
        """The deadline timer runs while anything is pending (the core arms it through this)."""
        if self._timer is None:
            self._timer = self._loop.call_later(_TICK, self._tick)
        self._core.timer_armed = True

    def _lost(self) -> ConnectionLost:
        err = ConnectionLost(self._reason)
        err.__cause__ = self._cause
        return err

    # -- handshake and errors ------------------------------------------------------------

    def _on_welcome(self, payload: bytes) -> None:
        try:
            doc = msgpack.unpackb(payload)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError(f"unsupported WELCOME {doc!r:.80}")
            limit = doc["max_payload"]
            if not isinstance(limit, int) or not 0 < limit <= MAX_PAYLOAD_LIMIT:
                raise ValueError(f"bad max_payload {limit!r}")
            address = verify_welcome(self._expected, doc["pubkey"], doc["sig"], self._nonce)
        except AddressError as exc:
            self._fail(f"broker at {self._endpoint} failed verification: {exc}", exc)
            return
        except Exception as exc:
            self._fail(f"broker at {self._endpoint} sent a bad WELCOME: {exc!r}", exc,
                       error_code=ErrorCode.HANDSHAKE)
            return
        self.address = address
        self.server = str(doc.get("server", ""))
        caps = doc.get("caps")
        caps = caps if isinstance(caps, list) else []
        self.confirms = "confirm" in caps
        self.leases = "lease" in caps
        self.deadlines = "deadline" in caps
        self.cancels = "cancel" in caps
        self.priorities = "priority" in caps
        self.delays = "delay" in caps
        lease = doc.get("lease")
        self.lease = float(lease) if isinstance(lease, (int, float)) and lease > 0 else 0.0
        self.scheme = "command" if doc.get("scheme") == "command" else "basic"
        commands = doc.get("commands")
        if isinstance(commands, list):
            try:
                self.commands = [Command(**c) for c in commands]
            except (TypeError, ValueError) as exc:
                log.warning("broker %s sent a bad command schema: %s", address, exc)
        user_limit = self._client._max_payload
        self.max_send = min(limit, user_limit) if user_limit else limit
        core = self._core
        granted = doc.get("prefetch")
        if isinstance(granted, int) and 0 < granted < self._prefetch:
            log.warning("broker %s granted a prefetch of %d (%d asked): its limit", address, granted,
                        self._prefetch)
            self._prefetch = granted
        core.set_max_payload(limit)  # frames after WELCOME are held to the broker's own limit
        core.max_send = self.max_send
        if self.deadlines:  # requests carry the default timeout as their deadline
            core.deadline_ms = _deadline_ms(self._timeout)
            self._grace = DEADLINE_GRACE
        if self._handler is not None and not self._handler_async and not self._wants_context:
            core.handler = self._handler  # sync handler: DELIVERs are run in the core from now on
        self._sync_fast()
        self.welcome.set_result(None)

    def _on_error(self, fid: int, payload: bytes) -> None:
        try:
            doc = msgpack.unpackb(payload)
            err = BrokerError(int(doc["code"]), str(doc["reason"]))
            errno = int(doc.get("errno", 0))
        except Exception:
            err = BrokerError(0, f"malformed ERROR frame {payload[:80]!r}")
            errno = 0
        if fid == 0 or self.address is None:
            self._fail(f"broker closed the connection: {err}", err)
        elif err.code in _ANSWER_ERRORS:  # about one of our ANSWERs (a delivery id)
            self.stats["late_answers"] += 1
            log.warning("broker refused the answer to delivery %d: %s", fid, err)
        else:
            entry = self._core.pop(fid)
            if entry is None:
                entry = self._custom.pop(fid, None)
            self.stats["refused"] += 1
            if entry is not None:
                self._complete(fid, entry, None, _typed_refusal(err, errno, confirmation=False))
            elif err.code in _LATE_WORD:  # about a request we gave up on already (Expired, cancelled)
                log.debug("broker on message %d, given up already: %s", fid, err)
            else:  # a publish(), or a request already timed out
                if self._unconfirmed and fid >= self._unconfirmed[0].id and err.code in _REFUSALS:
                    self._refuse_confirm(fid, _typed_refusal(err, errno, confirmation=True))
                self._refused(fid, err)

    # -- confirmations -------------------------------------------------------------------

    def publish_confirmation(self) -> Confirmation:
        """A new publish()'s Confirmation (its id taken), kept until the broker confirms it."""
        c = Confirmation(self, self._core.take_id())
        self._unconfirmed.append(c)
        return c

    def _on_confirm(self, fid: int, payload: bytes) -> None:
        # CONFIRM: this connection's SENDs flagged CONFIRM up to fid, ``count`` of them, are stored
        count = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
        pending = self._unconfirmed
        done = 0
        while pending and pending[0].id <= fid:
            c = pending.popleft()
            c._state = True
            done += 1
            fut = c._fut
            if fut is not None and not fut.done():
                fut.set_result(None)
        if done != count:
            log.warning("broker %s confirmed %d messages up to %d; %d were waiting", self.address, count, fid, done)
        if self._drained:
            self._wake_drained()

    def _refuse_confirm(self, fid: int, exc: BaseException) -> None:
        # a SEND flagged CONFIRM was refused: it will never be confirmed
        for c in self._unconfirmed:
            if c.id == fid:
                break
        else:
            return
        self._unconfirmed.remove(c)
        c._state = exc
        if c._fut is not None and not c._fut.done():
            c._fut.set_exception(exc)
        if self._drained:
            self._wake_drained()

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def wait_unconfirmed_at_most(self, limit: int) -> asyncio.Future[None]:
        fut = self._loop.create_future()
        if len(self._unconfirmed) <= limit:
            fut.set_result(None)
        elif self._closing:
            fut.set_exception(self._lost())
        else:
            self._drained.append((limit, fut))
        return fut

    def _wake_drained(self) -> None:
        n = len(self._unconfirmed)
        keep = []
        for limit, fut in self._drained:
            if fut.done():
                continue
            if n <= limit:
                fut.set_result(None)
            else:
                keep.append((limit, fut))
        self._drained = keep

    def _refused(self, fid: int, err: BrokerError) -> None:
        """A message nobody waits for was refused: the callback, and a rate-limited log line."""
        callback = self._client._on_refused
        if callback is not None:
            try:
                callback(fid, err)
            except Exception:
                log.exception("on_refused callback for message %d raised", fid)
        if self._refusal_timer is None:
            log.warning("broker %s refused message %d: %s", self.address, fid, err)
            self._refusal_timer = self._loop.call_later(_REFUSAL_LOG_INTERVAL, self._log_refusals)
        else:
            self._refusals_unlogged += 1

    def _log_refusals(self) -> None:
        self._refusal_timer = None
        n, self._refusals_unlogged = self._refusals_unlogged, 0
        if n:
            log.warning("broker %s refused %d more message%s in the last %g s (stats['refused']: %d)",
                        self.address, n, "" if n == 1 else "s", _REFUSAL_LOG_INTERVAL,
                        self.stats["refused"])

    # -- producer side -------------------------------------------------------------------

    def submit(self, payload: bytes, entry: Any, is_future: bool) -> int:
        """Send a request with the default timeout (request(), and send() off its fast path)."""
        mid = self._core.send(payload, entry, is_future)
        if mid >= 0:
            return mid
        if self._held:  # rare: tracked now, sent when the broker lets us go on
            mid = self._core.register(entry, is_future)
            if self.deadlines and len(payload) + 4 <= self._core.max_payload:
                self._deferred_due[mid] = self._loop.time() + self._timeout
                payload = _deadline_prefix(self._timeout) + payload
                self._deferred.append((_SEND, _DEADLINE, mid, payload))
            else:
                self._deferred.append((_SEND, 0, mid, payload))
            self.stats["sent"] += 1
            if self._timer is None:
                self._timer = self._loop.call_later(_TICK, self._tick)
            return mid
        mid = self._core.submit(payload, entry, is_future)
        if self._timer is None:
            self._timer = self._loop.call_later(_TICK, self._tick)
        if not self._core.flush_scheduled:
            self._core.flush_scheduled = True
            self._loop.call_soon(self._flush)
        return mid

    def submit_custom(self, payload: Any, entry: Any, timeout: float, flags: int = 0) -> int:
        """Send a request whose timeout differs from the client's default (or a collect()).
        With a broker that takes deadlines, a request (not a collect(), not an API call)
        carries its timeout as its deadline."""
        mid = self._core.take_id()
        self._custom[mid] = entry
        grace = 0.0
        if self.deadlines and type(entry) is not Collector and not flags & _API and \
                len(payload) + 4 <= self._core.max_payload:
            flags |= _DEADLINE
            payload = _deadline_prefix(timeout) + bytes(payload)
            grace = self._grace
            if self._held:
                self._deferred_due[mid] = self._loop.time() + timeout
        heapq.heappush(self._heap, (self._loop.time() + timeout + grace, mid, timeout))
        self._write(_SEND, flags, mid, payload)
        self.stats["sent"] += 1
        if self._timer is None:
            self._timer = self._loop.call_later(_TICK, self._tick)
        return mid

    def forget(self, mid: int) -> Any:
        """Drop a pending request (its awaiting task was cancelled, or Client.cancel): the
        broker is told to withdraw it (CANCEL) when it speaks "cancel". Returns its entry, or
        None when it was not pending."""
        entry = self._core.pop(mid)
        if entry is None:
            entry = self._custom.pop(mid, None)
            if entry is None:
                return None
        self._deferred_due.pop(mid, None)
        self._deferred_at.pop(mid, None)
        for i, frame in enumerate(self._deferred):
            if frame[0] == _SEND and frame[2] == mid:
                del self._deferred[i]  # held back by the broker, never sent: nothing to withdraw
                self.stats["cancelled"] += 1
                return entry
        if self.cancels and not self._closing:
            self.stats["cancelled"] += 1
            self._write(_CANCEL, 0, mid, b"")  # (after what FLOW holds back: in order)
        return entry

    def next_id(self) -> int:
        return self._core.take_id()

    @property
    def pending_count(self) -> int:
        return self._core.npending + len(self._custom)

    def _tick(self) -> None:
        """Close a deadline bucket, fail what is due; runs every _TICK while anything is pending."""
        self._timer = None
        if self._closing:
            return
        core, buckets = self._core, self._buckets
        now = self._loop.time()
        last_sent = core.next_id - 1
        if last_sent > self._bucket_last:
            # every id up to last_sent was sent at or before now (past its deadline, the grace:
            # the broker's EXPIRED, or a late consumer's answer, may still come)
            buckets.append((now + self._timeout + self._grace, last_sent))
            self._bucket_last = last_sent
        expired: list[tuple[int, Any, float]] = []
        last = 0
        while buckets and buckets[0][0] <= now:
            last = buckets.popleft()[1]
        if last and core.npending:
            expired.extend((mid, entry, self._timeout) for mid, entry in core.expire_upto(last))
        heap, custom = self._heap, self._custom
        while heap and heap[0][0] <= now:
            _, mid, timeout = heapq.heappop(heap)
            entry = custom.pop(mid, None)
            if entry is not None:
                expired.append((mid, entry, timeout))
        for mid, entry, timeout in expired:
            self.stats["timeouts"] += 1
            if self._grace and type(entry) is not Collector:
                err: RequestTimeout = Expired(f"no answer to message {mid} within its deadline of {timeout:g} s "
                                              f"(and no word from the broker {self._grace:g} s after it)")
            else:
                err = RequestTimeout(f"no answer to message {mid} within {timeout:g} s")
            self._complete(mid, entry, None, err)
        if self._closing:
            return
        if core.npending or custom:
            self._timer = self._loop.call_later(_TICK, self._tick)
        else:
            buckets.clear()
            heap.clear()
        core.timer_armed = self._timer is not None

    @staticmethod
    def _complete(mid: int, entry: Any, data: bytes | None, err: BaseException | None) -> None:
        if isinstance(entry, asyncio.Future):
            if not entry.done():
                if err is None:
                    entry.set_result(data)
                else:
                    entry.set_exception(err)
        else:
            try:
                entry(mid, data, err)
            except Exception:
                log.exception("send() callback for message %d raised", mid)

    async def drain(self) -> None:
        """Write what is buffered now, yield, and wait while held back (flow control)."""
        if self._closing:
            raise self._lost()
        if len(self._wbuf):
            self._flush()  # a publish loop that never yields would otherwise never send
        if not self.paused:
            await asyncio.sleep(0)  # let replies, pongs and FLOW frames in
        while self.paused and not self._closing:
            if self._resume is None:
                self._resume = self._loop.create_future()
            await asyncio.shield(self._resume)
        if self._closing:
            raise self._lost()

    # -- consumer side -------------------------------------------------------------------

    def _on_deliver(self, flags: int, did: int, payload: bytes) -> None:
        stats = self.stats
        stats["received"] += 1
        if flags & _REDELIVERED:
            stats["redelivered"] += 1
        handler = self._handler
        if handler is None:
            log.warning("broker delivered message %d to a client without a handler", did)
            self._write(_ERROR, 0, did, msgpack.packb(
                {"code": int(ErrorCode.NOT_ALLOWED), "reason": "this client does not consume"}))
            return
        if self._by_user:
            self._release(did)  # closing: handed back, the broker gives it to another consumer
            return
        ctx = None
        if self._wants_context:
            ctx = DeliveryContext(did, flags, self._loop.time() + self._max_handler_time, self._loop)
        if self._handler_async:
            if len(self._tasks) >= self._prefetch:
                self._backlog.append((did, flags, payload))
                self._track(did, ctx, None)
            else:
                self._start(did, payload, None, ctx)
            return
        try:
            result = handler(payload, ctx) if ctx is not None else handler(payload)
        except Exception as exc:
            self._failed(did, exc)
            return
        if inspect.isawaitable(result):
            self._start(did, payload, result, ctx)
            return
        self._answer(did, result)

    def _start(self, did: int, payload: bytes, awaitable: Awaitable[Any] | None,
               ctx: DeliveryContext | None = None) -> None:
        try:
            if awaitable is None:
                handler = self._handler
                assert handler is not None  # a consumer's
                awaitable = handler(payload, ctx) if ctx is not None else handler(payload)
            task = asyncio.ensure_future(awaitable)
        except Exception as exc:
            self._running.pop(did, None)
            self._failed(did, exc)
            return
        self._tasks[task] = did
        self._track(did, ctx, task)
        task.add_done_callback(self._task_done)

    def _track(self, did: int, ctx: DeliveryContext | None, task: asyncio.Future[Any] | None) -> None:
        # a delivery whose handler runs (or waits for a task slot): its lease is kept by TOUCH
        started = self._running.get(did)
        self._running[did] = (started[0] if started is not None else self._loop.time(), ctx, task)
        if self._touch_timer is None and not self._closing:
            self._touch_timer = self._loop.call_later(self._touch_interval(), self._touch)

    def _touch_interval(self) -> float:
        # well within the lease (a third of it), and often enough to see the handler limit pass
        interval = self.lease / 3 if self.lease else 1.0
        return max(0.05, min(interval, self._max_handler_time / 4 if self._max_handler_time else interval))

    def _touch(self) -> None:
        """Every third of a lease while handlers run: one TOUCH frame of their delivery ids (the
        broker extends their leases); a handler past max_handler_time is cancelled instead and
        its delivery left to the lease (the broker gives it to another consumer)."""
        self._touch_timer = None
        if self._closing or not self._running:
            return
        now = self._loop.time()
        limit = self._max_handler_time
        keep: list[int] = []
        for did, (started, _ctx, task) in list(self._running.items()):
            if limit and now - started > limit:
                del self._running[did]
                self.stats["handler_timeouts"] += 1
                if task is not None:
                    self._tasks.pop(task, None)
                    task.cancel()
                else:
                    self._backlog = deque(b for b in self._backlog if b[0] != did)
                # a failure of the message's (a nack): the broker gives it to another consumer
                # after its backoff, and this consumer's credit comes back
                self._failed(did, None, f"the handler ran past max_handler_time ({limit:g} s): cancelled")
            else:
                keep.append(did)
        if keep and self.leases and self.lease:
            step = max(1, self.max_send // 8)
            for i in range(0, len(keep), step):
                chunk = keep[i:i + step]
                self._wbuf.add(_TOUCH, 0, 0, b"".join(d.to_bytes(8, "little") for d in chunk))
            if not self._core.flush_scheduled:
                self._core.flush_scheduled = True
                self._loop.call_soon(self._flush)
        if self._running:
            self._touch_timer = self._loop.call_later(self._touch_interval(), self._touch)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        did = self._tasks.pop(task, None)
        if did is not None:  # (None: cancelled past max_handler_time, nacked then)
            self._running.pop(did, None)
            if not task.cancelled():
                exc = task.exception()
                if exc is not None:
                    self._failed(did, exc)
                else:
                    self._answer(did, task.result())
        backlog = self._backlog
        while backlog and len(self._tasks) < self._prefetch and not self._by_user:
            did, flags, payload = backlog.popleft()
            entry = self._running.get(did)
            self._start(did, payload, None, entry[1] if entry is not None else None)

    def _answer(self, did: int, result: Any) -> None:
        """ANSWER a delivery with the handler's result (None -> NO_ANSWER)."""
        if result is None:
            self.stats["answered"] += 1
            self._write(_ANSWER, _NO_ANSWER, did, b"")
            return
        try:
            data = to_payload(result)
        except TypeError:
            self._failed(did, None, f"handler returned {type(result).__name__}, "
                                    "expected bytes, bytearray, memoryview, str or None")
            return
        if len(data) > self.max_send:
            self._failed(did, None, f"answer of {len(data)} bytes is over the limit of {self.max_send}")
            return
        self.stats["answered"] += 1
        self._write(_ANSWER, 0, did, data)

    def _on_result(self, did: int, payload: bytes, result: Any, exc: BaseException | None) -> None:
        """A sync handler's result the core did not send as is (None, str, awaitable...), or its error."""
        if exc is not None:
            self._failed(did, exc)
        elif inspect.isawaitable(result):
            self._start(did, payload, result)
        else:
            self._answer(did, result)

    def _release(self, did: int) -> None:
        """Hand a delivery back unhandled (closing): no failure of the message's. A broker
        without "lease" redelivers it when the connection ends."""
        if self.leases and not self._closing:
            self._write(_ANSWER, _RETRY, did, msgpack.packb({"delay": 0, "error": None, "release": True}))

    def _failed(self, did: int, exc: BaseException | None, why: str | None = None) -> None:
        """The handler did not answer: Retry (a nack, after its delay or the broker's backoff),
        Reject (the dead-letter queue at once), any other error (logged, counted, a nack with
        the broker's backoff). A broker without "lease" gets NO_ANSWER, as before it had them."""
        if isinstance(exc, Retry):
            self.stats["retried"] += 1
            if self.leases:
                self._write(_ANSWER, _RETRY, did, msgpack.packb({"delay": exc.delay, "error": None}))
            else:
                self._write(_ANSWER, _NO_ANSWER, did, b"")
            return
        if isinstance(exc, Reject):
            self.stats["rejected"] += 1
            consumer_log.warning("delivery %d: rejected: %s", did, exc.reason)
            if self.leases:
                self._write(_ANSWER, _REJECT, did, msgpack.packb({"reason": exc.reason}))
            else:
                self._write(_ANSWER, _NO_ANSWER, did, b"")
            return
        self.stats["errors"] += 1
        text = why if why is not None else f"handler raised {type(exc).__name__}: {exc}"
        if self.leases:
            consumer_log.error("delivery %d: %s; the broker retries it later", did, text, exc_info=exc)
            self._write(_ANSWER, _RETRY, did, msgpack.packb({"delay": None, "error": text[:1000]}))
        else:
            consumer_log.error("delivery %d: %s; acknowledged without an answer", did, text, exc_info=exc)
            self._write(_ANSWER, _NO_ANSWER, did, b"")

    async def shutdown(self, grace: float) -> None:
        """Finish running handlers (up to ``grace`` s), flush, close, wait for the close."""
        if self.closed.done():
            return
        self._by_user = True
        self._core.handler = None  # deliveries from now on are handed back (_release)
        for did, _flags, _payload in self._backlog:
            self._running.pop(did, None)
            self._release(did)
        self._backlog.clear()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
        if not self._closing:
            self._reason = "connection closed by the client"
            self._flush()
            self._closing = True
            self._core.fast = False
            self._transport.close()  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), grace)
        except asyncio.TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            await self.closed
