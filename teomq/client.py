"""Producer and consumer clients of a teomq broker.

:class:`Client` is one TCP connection to a broker (:class:`teomq.client_connection.Connection`,
the asyncio protocol whose read path is the C ``ClientCore``); :class:`Producer` and
:class:`Consumer` are clients with the role fixed. In the command scheme a Consumer
registers command handlers (:meth:`Consumer.command`) and subscribes; a producer collects
every answer of a fanout command (:meth:`Client.collect`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

from teomq.addressbook import resolve_broker
from teomq.client_connection import (
    _API, _NO_REPLY, _PING, _SEND, DEFAULT_MAX_HANDLER_TIME, Collector, Confirmation, Connection, DeliveryContext,
    _deadline_prefix, _shift_prefix,
    consumer_log, log, to_payload as _to_payload,
)
from teomq.commands import Command, CommandCall, CommandSchema
from teomq.errors import (
    AddressError, BrokerError, Cancelled, ConnectionLost, QueueFull, Reconnecting, RequestTimeout, UnknownCommand,
)
from teomq.protocol import (
    DELAY_MAX, MAX_PAYLOAD_LIMIT, PRIORITY_MAX, RECONNECT_DELAY, RECONNECT_MAX_DELAY, ApiCommand, ErrorCode, Flag,
)

__all__ = ["Client", "Confirmation", "Consumer", "DeliveryContext", "Producer"]

_CONFIRM_FLAG = 0x10  # SEND: confirm it once stored (protocol.Flag.CONFIRM)

#: What request(), send() and publish() take; str is sent UTF-8 encoded.
Payload = Union[bytes, bytearray, memoryview, str]
#: A broker: "<address>@host:port", "host:port", "<address>" (local address book), ":port", or (host, port).
BrokerSpec = Union[str, tuple[str, int]]
#: send() callback: (message id, answer or None, error or None); called exactly once.
SendCallback = Callable[[int, Union[bytes, None], Union[BaseException, None]], object]
#: Consumer handler: data -> bytes | bytearray | memoryview | str | None, or an awaitable of that;
#: or (data, DeliveryContext) -> the same, when it declares a second parameter.
Handler = Callable[..., Any]

_ROLES = ("producer", "consumer", "both")
_FAIL_FAST = 0x40  # SEND: refused NO_CONSUMER when nobody consumes its queue (protocol.Flag.FAIL_FAST)
_DELAY = int(Flag.DELAY)
_DEADLINE = int(Flag.DEADLINE)
#: publish()es kept while the client is reconnecting, sent once it is back; past it QueueFull
PUBLISH_BUFFER = 10_000


def _number(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    return float(value)


def _schedule(conn: Connection, priority: int | None, delay: float | None,
              not_before: float | None) -> tuple[int, bytes, float]:
    """The SEND flags and payload prefix of a priority and a delay (docs/protocol.md), and the
    delay in seconds. ``not_before`` is a wall-clock time (time.time()); its delay is reckoned
    here, so the clocks of client and broker need not agree."""
    flags = 0
    prefix = b""
    wait = 0.0
    if priority is not None:
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= PRIORITY_MAX:
            raise ValueError(f"priority must be a whole number from 0 to {PRIORITY_MAX}, not {priority!r}")
        if not conn.priorities:
            raise RuntimeError("this broker does not take priorities (it does not speak \"priority\")")
        flags |= (priority + 1) << 8
    if delay is not None and not_before is not None:
        raise ValueError("give delay or not_before, not both")
    if not_before is not None:
        wait = max(0.0, _number("not_before", not_before) - time.time())
    elif delay is not None:
        wait = _number("delay", delay)
        if wait < 0:
            raise ValueError(f"delay must be 0 or more seconds, not {delay!r}")
    if wait > DELAY_MAX:
        raise ValueError(f"a delay is at most {DELAY_MAX:.0f} seconds, not {wait:g}")
    if wait > 0:
        if not conn.delays:
            raise RuntimeError("this broker does not take delays (it does not speak \"delay\")")
        flags |= _DELAY
        prefix = math.ceil(wait * 1000).to_bytes(4, "little")   # rounded up: never early
    return flags, prefix, wait


def _retrieved(fut: asyncio.Future[None]) -> None:
    # a reconnect that failed with nobody waiting for it is not an unretrieved exception
    if not fut.cancelled():
        fut.exception()


def _takes_context(fn: object) -> bool:
    """Whether a handler declares a second parameter without a default: it gets a DeliveryContext."""
    if fn is None:
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


class _StatsView(Mapping[str, int]):
    """Live counters of a Client: its Python-side counts plus the current core's."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def _snapshot(self) -> dict[str, int]:
        client = self._client
        snap = dict(client._counts)
        conn = client._conn
        if conn is not None and not conn._folded:
            conn.fold_counts(snap)
        return snap

    def __getitem__(self, key: str) -> int:
        return self._snapshot()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._client._counts)

    def __len__(self) -> int:
        return len(self._client._counts)

    def __repr__(self) -> str:
        return repr(self._snapshot())


class Client:
    """A connection to a teomq broker that can produce, consume, or both.

    :class:`Producer` and :class:`Consumer` are this class with the role fixed. All
    methods must be called from the event loop the client was connected on.

    Args:
        broker: ``"<address>@host:port"``, ``"host:port"``, ``":port"``, a 35-character
            address from the local address book, or a ``(host, port)`` tuple. When the
            spec names an address the broker must prove it holds that address's key;
            otherwise its signature is still checked and :attr:`address` says who it is.
        name: client name sent to the broker (default ``"<hostname>-<pid>"``).
        role: ``"producer"``, ``"consumer"`` or ``"both"``.
        prefetch: consumer credit: how many deliveries may be unanswered at once (>= 1).
        handler: consumer handler, required for the consumer roles (see :class:`Consumer`).
        timeout: default answer timeout of requests in seconds; also bounds connecting
            and the wait for running handlers on close.
        max_payload: largest payload this client sends; the effective limit is the smaller
            of this and the broker's limit from WELCOME.
        on_refused: ``on_refused(id, error)`` for each message the broker refused that
            nobody else hears of (a publish(); a request's caller gets the error itself),
            e.g. a :class:`BrokerError` QUEUE_FULL. Refusals are counted in
            ``stats["refused"]`` and logged (the first at once, then one line per second).
        reconnect: once connected, a lost connection is made again by the client itself
            (default True): HELLO with the same session, subscriptions made again, then
            what waited goes out (docs/semantics.md, "Reconnecting"). False: a lost
            connection ends the client (:class:`ConnectionLost`), as :meth:`close` does.
        reconnect_delay, reconnect_max_delay: the first try after about ``reconnect_delay``
            seconds (0.1), each next one after twice as long up to ``reconnect_max_delay``
            (2.0), each wait jittered (half to all of it).
        reconnect_tries: tries before the client gives up (0, the default: never).
        publish_buffer: publish()es kept while reconnecting (10,000), sent in order once
            connected again; past it publish() raises :class:`QueueFull`.
        on_connection: ``on_connection(connected, reason)``: called when the connection is
            lost (False, why) and when it is made again (True, "").
    """

    def __init__(self, broker: BrokerSpec, *, name: str | None = None, role: str = "both",
                 prefetch: int = 64, handler: Handler | None = None, timeout: float = 5.0,
                 max_payload: int | None = None,
                 on_refused: Callable[[int, BrokerError], None] | None = None,
                 max_handler_time: float = DEFAULT_MAX_HANDLER_TIME, reconnect: bool = True,
                 reconnect_delay: float = RECONNECT_DELAY, reconnect_max_delay: float = RECONNECT_MAX_DELAY,
                 reconnect_tries: int = 0, publish_buffer: int = PUBLISH_BUFFER,
                 on_connection: Callable[[bool, str], None] | None = None) -> None:
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}, not {role!r}")
        consumes = role != "producer"
        if consumes and not callable(handler):
            raise ValueError(f"a {role!r} client needs a handler")
        if not consumes and handler is not None:
            raise ValueError("a producer takes no handler")
        if consumes and (not isinstance(prefetch, int) or prefetch < 1):
            raise ValueError(f"prefetch must be an int >= 1, not {prefetch!r}")
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if max_payload is not None and not 0 < max_payload <= MAX_PAYLOAD_LIMIT:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD_LIMIT}, not {max_payload!r}")
        if isinstance(broker, tuple):
            host, port = broker
            if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"broker must be (host: str, port: int), not {broker!r}")
        elif not isinstance(broker, str):
            raise TypeError(f"broker must be a str or a (host, port) tuple, not {type(broker).__name__}")
        self._broker = broker
        self.name: str = name if name is not None else f"{socket.gethostname()}-{os.getpid()}"
        self._role = role
        self._produces = role != "consumer"
        self._prefetch = prefetch if consumes else 0
        self._handler = handler if consumes else None
        self._handler_async = inspect.iscoroutinefunction(handler)
        self._wants_context = _takes_context(handler) if consumes else False
        if not (isinstance(max_handler_time, (int, float)) and 0 < max_handler_time < math.inf):
            raise ValueError(f"max_handler_time must be a positive number of seconds, not {max_handler_time!r}")
        self._max_handler_time = float(max_handler_time)
        self._timeout = float(timeout)
        self._max_payload = max_payload
        if on_refused is not None and not callable(on_refused):
            raise TypeError("on_refused must be callable")
        self._on_refused = on_refused
        if not isinstance(reconnect, bool):
            raise TypeError(f"reconnect must be True or False, not {reconnect!r}")
        if not (isinstance(reconnect_delay, (int, float)) and 0 < reconnect_delay <= reconnect_max_delay < math.inf):
            raise ValueError("reconnect_delay must be a positive number of seconds, at most reconnect_max_delay "
                             f"(not {reconnect_delay!r} and {reconnect_max_delay!r})")
        if not isinstance(reconnect_tries, int) or isinstance(reconnect_tries, bool) or reconnect_tries < 0:
            raise ValueError(f"reconnect_tries must be 0 (never give up) or more, not {reconnect_tries!r}")
        if not isinstance(publish_buffer, int) or isinstance(publish_buffer, bool) or publish_buffer < 0:
            raise ValueError(f"publish_buffer must be 0 or more messages, not {publish_buffer!r}")
        if on_connection is not None and not callable(on_connection):
            raise TypeError("on_connection must be callable")
        self._reconnect = reconnect
        self._reconnect_delay = float(reconnect_delay)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._reconnect_tries = reconnect_tries
        self._publish_buffer = publish_buffer
        self._on_connection = on_connection
        #: while reconnecting: done once connected again (or failed: the client gave up)
        self._down: asyncio.Future[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._resolved: tuple[str, int, str | None] | None = None   # the spec, as last resolved
        #: publish()es made while reconnecting: (flags, payload, loop time made, Confirmation)
        self._buffered: list[tuple[int, bytes, float, Confirmation]] = []
        self._closed_by_user = False
        self._gave_up: BaseException | None = None
        self._ended: asyncio.Future[None] | None = None   # wait_closed() of a reconnecting client
        #: this client's producer session, sent in HELLO: answers are routed to it (an
        #: unguessable id for the client object's life; a session lives as long as its connection)
        self.session: str = secrets.token_urlsafe(16)
        self._conn: Connection | None = None
        self._address: str | None = None
        #: Counters. Producing: sent, replies, timeouts, refused (ERROR for a message), held_back
        #: (times the broker held this client back with FLOW; its SENDs waited in the client).
        #: cancelled (requests withdrawn). Consuming: received, answered (incl. None -> NO_ANSWER),
        #: errors (handler raised or returned a bad answer: retried by the broker), retried
        #: (handlers that raised Retry), rejected (raised Reject), redelivered, late_answers
        #: (answers the broker refused: the lease had run out), handler_timeouts (handlers
        #: cancelled past max_handler_time).
        self._subscriptions: dict[str, None] = {}  # ordered set
        self._counts: dict[str, int] = dict.fromkeys((
            "sent", "replies", "timeouts", "refused", "held_back", "cancelled", "received", "answered", "errors",
            "retried", "rejected", "redelivered", "late_answers", "handler_timeouts"), 0)
        self._stats_view = _StatsView(self)

    # -- lifecycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, say HELLO and verify the broker's WELCOME.

        Raises:
            ConnectionLost: the broker cannot be reached or closed the connection (the first
                connect is not retried: a lost connection is, with ``reconnect``).
            AddressError: bad broker spec, or the broker failed identity verification.
            BrokerError: the broker refused the HELLO.
            RuntimeError: already connected.
        """
        if self._conn is not None and (not self._conn.closed.done() or self._down is not None):
            raise RuntimeError("already connected")
        self._closed_by_user = False
        self._gave_up = None
        self._ended = None
        await self._open()
        if self._subscriptions:
            try:
                await self.subscribe(*self._subscriptions)
            except BaseException:
                await self.close()
                raise

    async def _open(self, again: bool = False) -> None:
        """One connection: TCP, HELLO (this client's session), the broker's WELCOME verified.
        ``again`` (reconnecting): an address the local address book no longer has (its broker
        removes its entry when it stops) is where it was last found."""
        if isinstance(self._broker, tuple):
            host, port, expected = self._broker[0], self._broker[1], None
        else:
            try:
                host, port, expected = resolve_broker(self._broker)
            except AddressError:
                if not again or self._resolved is None:
                    raise
                host, port, expected = self._resolved
            self._resolved = (host, port, expected)
        endpoint = f"{host}:{port}"
        conn = Connection(self, expected, endpoint)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), self._timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to broker at {endpoint}: {exc}") from exc
        except asyncio.TimeoutError:
            raise ConnectionLost(f"cannot connect to broker at {endpoint}: "
                                 f"no connection within {self._timeout:g} s") from None
        try:
            await asyncio.wait_for(asyncio.shield(conn.welcome), self._timeout)
        except asyncio.TimeoutError:
            conn.welcome.cancel()
            conn._fail(f"broker at {endpoint} sent no WELCOME within {self._timeout:g} s", None)
            raise ConnectionLost(conn._reason) from None
        except BaseException:
            conn.welcome.cancel()
            conn._fail("connect() was cancelled or failed", None)
            raise
        self._conn = conn
        self._address = conn.address
        log.debug("connected to broker %s at %s as %r (%s)", conn.address, endpoint, self.name, self._role)

    # -- reconnecting ----------------------------------------------------------------------

    def _lost_connection(self, conn: Connection) -> None:
        """From Connection.connection_lost, before its pending requests fail: a client that
        reconnects begins to (not one closed by its user, nor a connection never welcomed)."""
        if conn is not self._conn or conn._by_user or self._closed_by_user or not self._reconnect \
                or self._down is not None or conn.address is None:
            return
        self._down = conn._loop.create_future()
        self._down.add_done_callback(_retrieved)
        self._reconnector = conn._loop.create_task(self._reconnect_loop(conn._reason))

    async def _reconnect_loop(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        log.warning("%s: %s (%s); reconnecting", self.name, reason, self._broker)
        self._notify(False, reason)
        delay = self._reconnect_delay
        tries = 0
        while True:
            await asyncio.sleep(random.uniform(delay / 2, delay))   # jittered: not all at once
            tries += 1
            try:
                await self._open(again=True)
                for name in list(self._subscriptions):    # (this task's calls do not wait for it)
                    await self._call(b"subscribe/" + name.encode("utf-8"))
                break
            except (AddressError, BrokerError) as exc:
                if not (isinstance(exc, BrokerError) and exc.code == ErrorCode.HANDSHAKE):
                    # another broker answers there, or this one refuses a subscription: never
                    # better for trying again (a session still held by a connection it has not
                    # seen end is: HANDSHAKE)
                    await self._give_up(exc, tries)
                    return
                why: BaseException = exc
            except (OSError, ConnectionLost, RequestTimeout) as exc:
                why = exc
            except Exception as exc:     # not foreseen: what waits is told, nothing hangs
                await self._give_up(exc, tries)
                return
            if self._reconnect_tries and tries >= self._reconnect_tries:
                await self._give_up(ConnectionLost(f"gave up reconnecting to broker {self._broker} after {tries} "
                                                   f"tries: {why}"), tries)
                return
            log.debug("%s: reconnecting, try %d: %s", self.name, tries, why)
            delay = min(delay * 2.0, self._reconnect_max_delay)
        log.warning("%s: connected to broker %s again after %d tr%s in %.1f s", self.name, self._address, tries,
                    "y" if tries == 1 else "ies", loop.time() - started)
        self._send_buffered()
        down, self._down = self._down, None
        self._reconnector = None
        if down is not None and not down.done():
            down.set_result(None)
        self._notify(True, "")

    async def _give_up(self, exc: BaseException, tries: int) -> None:
        log.error("%s: not reconnecting to broker %s (%d tr%s): %s", self.name, self._broker, tries,
                  "y" if tries == 1 else "ies", exc)
        self._gave_up = exc
        self._reconnector = None
        self._fail_waiting(exc)
        if self._conn is not None and not self._conn.closed.done():
            await self._conn.shutdown(self._timeout)
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(exc)
        self._notify(False, str(exc))

    def _fail_waiting(self, exc: BaseException) -> None:
        # what waited for the reconnect: buffered publishes and the calls waiting (_down)
        buffered, self._buffered = self._buffered, []
        for _flags, _payload, _made, c in buffered:
            c._state = exc
            if c._fut is not None and not c._fut.done():
                c._fut.set_exception(exc)
        down, self._down = self._down, None
        if down is not None and not down.done():
            down.set_exception(exc)

    def _notify(self, connected: bool, reason: str) -> None:
        if self._on_connection is not None:
            try:
                self._on_connection(connected, reason)
            except Exception:
                log.exception("%s: on_connection raised", self.name)

    def _send_buffered(self) -> None:
        # the publish()es made while reconnecting go out on the new connection, in order, their
        # delay and ttl counted from when they were made
        conn = self._conn
        assert conn is not None
        now = conn._loop.time()
        buffered, self._buffered = self._buffered, []
        for flags, payload, made, c in buffered:
            if flags & (_DEADLINE | _DELAY):
                payload = _shift_prefix(flags, payload, (now - made) * 1000.0, None)
            if len(payload) > conn.max_send:
                c._state = ValueError(f"payload of {len(payload)} bytes is over the broker's limit of {conn.max_send}")
                if c._fut is not None and not c._fut.done():
                    c._fut.set_exception(c._state)
                continue
            if conn.confirms:
                c._conn = conn
                c.id = conn._core.take_id()
                conn._unconfirmed.append(c)
                conn._write(_SEND, flags | _CONFIRM_FLAG, c.id, payload)
            else:
                conn._write(_SEND, flags, conn.next_id(), payload)
                c._state = True
                if c._fut is not None and not c._fut.done():
                    c._fut.set_result(None)
            self._counts["sent"] += 1

    async def _wait_up(self, limit: float | None) -> float:
        """While reconnecting: wait until connected again (up to ``limit`` s); the seconds
        waited. Raises RequestTimeout past the limit, ConnectionLost when the client gave up
        or was closed. Calls of the reconnect itself (its subscriptions) do not wait."""
        down = self._down
        if down is None or asyncio.current_task() is self._reconnector:
            return 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(down), limit)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"not connected to broker {self._broker} again within {limit:g} s "
                                 "(the client is reconnecting): not sent") from None
        return loop.time() - start

    @property
    def reconnecting(self) -> bool:
        """The connection was lost and the client is making it again."""
        return self._down is not None

    async def close(self) -> None:
        """Close the connection; idempotent.

        Running async handlers get up to ``timeout`` seconds to finish and answer;
        deliveries not answered by then are redelivered by the broker. Requests still
        awaiting an answer fail with :class:`ConnectionLost` (await them first); so do
        publishes buffered while reconnecting, and the reconnecting stops.
        """
        self._closed_by_user = True
        task, self._reconnector = self._reconnector, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail_waiting(ConnectionLost("the client was closed while reconnecting"))
        if self._conn is not None:
            await self._conn.shutdown(self._timeout)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the client is closed (:meth:`close`), or gave up reconnecting.

        Raises:
            ConnectionLost: the connection ended other than by :meth:`close` (with
                ``reconnect``: the client gave up, ``reconnect_tries`` or another broker).
        """
        conn = self._require()
        if not self._reconnect:
            await asyncio.shield(conn.closed)
            if not conn._by_user:
                raise conn._lost()
            return
        if self._gave_up is not None:
            raise self._gave_up
        if self._closed_by_user and self._down is None:
            await asyncio.shield(conn.closed)
            return
        if self._ended is None:
            self._ended = conn._loop.create_future()
        await asyncio.shield(self._ended)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- properties ----------------------------------------------------------------------

    @property
    def stats(self) -> Mapping[str, int]:
        """The counters (see the class docstring), over all connections so far.

        A live read-only view: ``stats["received"]`` is always current; ``dict(stats)`` is
        a snapshot. (Counters of the C read path are kept in the core and added on read.)
        """
        return self._stats_view

    @property
    def address(self) -> str | None:
        """The broker's verified address (None before the first connect)."""
        return self._address

    @property
    def server(self) -> str | None:
        """The broker's self-description from WELCOME."""
        return self._conn.server if self._conn is not None else None

    @property
    def max_payload(self) -> int | None:
        """Largest payload this client may send (known once connected)."""
        return self._conn.max_send if self._conn is not None else None

    @property
    def connected(self) -> bool:
        """True between a successful connect() and the connection's end."""
        return self._conn is not None and not self._conn._closing

    @property
    def pending(self) -> int:
        """Number of requests awaiting an answer."""
        return self._conn.pending_count if self._conn is not None else 0

    # -- producing -----------------------------------------------------------------------

    def _require(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("not connected: call connect() or use 'async with'")
        return self._conn

    def _prepare(self, data: Payload, timeout: float | None) -> tuple[Connection, Any, float]:
        conn = self._require()
        if not self._produces:
            raise RuntimeError("this client cannot produce (a consumer created with producer=False)")
        if conn._closing and self._down is None:
            raise self._gave_up if self._gave_up is not None else conn._lost()
        payload = _to_payload(data)
        if len(payload) > conn.max_send:
            raise ValueError(f"payload of {len(payload)} bytes is over the limit of {conn.max_send}")
        if timeout is None:
            timeout = self._timeout
        elif not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return conn, payload, timeout

    async def request(self, data: Payload, timeout: float | None = None, *, fail_fast: bool = False,
                      priority: int | None = None, delay: float | None = None,
                      not_before: float | None = None) -> bytes:
        """Send a message and wait for its answer.

        If the connection is held back (the broker reads slower than we write, or told
        us to hold back: its queue is at the high mark), waits for it to go on first.

        Args:
            data: the message (str is sent UTF-8 encoded).
            timeout: seconds to wait for the answer; default the client's ``timeout``. It is
                the request's deadline too: the broker never delivers it later (docs/semantics.md).
            fail_fast: raise :class:`NoConsumer` at once when nobody consumes its queue, instead
                of waiting in the queue for a consumer.
            priority: 0 (the lowest) to 7: a higher level is served first; default its
                command's (the schema's ``priority``, else 0).
            delay: seconds before it may be delivered (counted in ``timeout``, so shorter);
                or ``not_before``: a wall-clock time (``time.time()``).

        Returns:
            The consumer's answer.

        Raises:
            Expired: no consumer took it within ``timeout`` (the broker removed it), or no answer
                came (a subclass of RequestTimeout: a broker without deadlines raises that).
            QueueFullError: the broker's queue is full (not accepted; retryable).
            DeadLettered: it failed too often at its consumers (in the dead-letter queue).
            Rejected: its consumer rejected it (``teomq.Reject``).
            NoConsumer: ``fail_fast`` and nobody consumes it.
            BrokerError: the broker refused the message otherwise (UNKNOWN_COMMAND...).
            StorageError: the broker cannot store messages now (a disk error); retryable.
            ConnectionLost: the connection closed before the answer came.
            ValueError: payload over :attr:`max_payload`.

        Cancelling the awaiting task withdraws the request: the broker takes it out of its
        queue, or tells the consumer that holds it (its DeliveryContext shows it cancelled).
        """
        if self._down is not None:   # reconnecting: it waits (its timeout runs), then goes out
            given = self._timeout if timeout is None else timeout
            timeout = given - await self._wait_up(given)
            if timeout <= 0:
                raise RequestTimeout(f"not sent within its timeout of {given:g} s: the client was reconnecting")
        conn, payload, timeout = self._prepare(data, timeout)
        flags, prefix, wait = (0, b"", 0.0) if priority is None and delay is None and not_before is None \
            else _schedule(conn, priority, delay, not_before)
        if wait >= timeout:
            raise ValueError(f"a request's delay ({wait:g} s) must be shorter than its timeout ({timeout:g} s)")
        if prefix and len(prefix) + len(payload) > conn.max_send:
            raise ValueError(f"payload of {len(payload)} bytes and its delay are over the limit of {conn.max_send}")
        if conn.paused:
            held = conn._loop.time()
            try:
                await asyncio.wait_for(conn.drain(), timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"held back by flow control for {timeout:g} s (the broker did not read, "
                                     "or its bound is reached); message not sent") from None
            if conn._closing:
                raise conn._lost()
            if wait > 0:   # its delay counts from the call: the time held back is taken off (whole ms)
                left = math.ceil(wait * 1000) - int((conn._loop.time() - held) * 1000)
                prefix = max(0, left).to_bytes(4, "little")
        fut = conn._loop.create_future()
        if timeout == self._timeout and type(payload) is bytes and not fail_fast and not flags:
            mid = conn.submit(payload, fut, True)
        else:
            mid = conn.submit_custom(prefix + bytes(payload) if prefix else payload, fut, timeout,
                                     flags | (_FAIL_FAST if fail_fast else 0))
        try:
            return await fut
        except asyncio.CancelledError:
            conn.forget(mid)
            raise

    def send(self, data: Payload, callback: SendCallback, timeout: float | None = None) -> int:
        """Send a message; ``callback(id, answer, error)`` gets the outcome.

        The callback is called exactly once, later on the event loop, with either the
        answer (``error`` None) or an error (:class:`RequestTimeout`,
        :class:`BrokerError`, :class:`ConnectionLost`) and ``answer`` None. If send()
        raises, the callback is never called. Does not wait for flow control; call
        :meth:`drain` between bursts.

        Returns:
            The message id.
        """
        conn = self._conn
        if timeout is None and conn is not None:
            mid = conn._core.send(data, callback, False)  # the common case: checked and sent in C
            if mid >= 0:
                return mid
        if not callable(callback):
            raise TypeError("callback must be callable")
        if self._down is not None:
            raise Reconnecting(f"not connected to broker {self._broker} now (the client is reconnecting): not sent; "
                               "await drain() first, or use request()")
        conn, payload, timeout = self._prepare(data, timeout)
        if timeout == self._timeout and type(payload) is bytes:
            return conn.submit(payload, callback, False)
        return conn.submit_custom(payload, callback, timeout)

    def cancel(self, mid: int) -> bool:
        """Withdraw a :meth:`send` still waiting for its answer: the broker takes it out of its
        queue, or tells the consumer that holds it; its callback gets :class:`~teomq.Cancelled`
        (now, on this loop). False when ``mid`` is not pending (answered, failed, or unknown)."""
        conn = self._conn
        entry = conn.forget(mid) if conn is not None else None
        if entry is None:
            return False
        conn._complete(mid, entry, None, Cancelled(f"message {mid} cancelled by its producer"))  # type: ignore[union-attr]
        return True

    def publish(self, data: Payload, *, priority: int | None = None, delay: float | None = None,
                not_before: float | None = None, ttl: float | None = None) -> Confirmation:
        """Send a message with no answer (NO_REPLY); returns a :class:`Confirmation` to await
        for the broker's word that it is stored (optional: not awaiting it changes nothing).

        ``priority``: 0 (the lowest) to 7, a higher level served first (default: its command's,
        else 0). ``delay`` (seconds) or ``not_before`` (a wall-clock time, ``time.time()``): it
        is stored at once and delivered no earlier. ``ttl``: seconds it may wait for a consumer
        (counted from now, its delay included); past it the broker removes it (default: its
        command's ``ttl``, else none). A broker restart keeps all of them (docs/semantics.md).

        Does not wait for flow control; call :meth:`drain` between bursts, or keep a window of
        unconfirmed messages with :meth:`confirmed`. A refusal by the broker goes to
        ``on_refused``, the log, and the Confirmation.
        """
        conn, payload, _ = self._prepare(data, None)
        flags = _NO_REPLY
        if priority is not None or delay is not None or not_before is not None or ttl is not None:
            more, prefix, wait = _schedule(conn, priority, delay, not_before)
            if ttl is not None:
                if _number("ttl", ttl) <= 0 or ttl > DELAY_MAX:
                    raise ValueError(f"ttl must be more than 0 and at most {DELAY_MAX:.0f} seconds, not {ttl!r}")
                if not conn.deadlines:
                    raise RuntimeError("this broker does not take a time to live (it does not speak \"deadline\")")
                more |= _DEADLINE
                prefix = _deadline_prefix(ttl) + prefix
            if len(prefix) + len(payload) > conn.max_send:
                raise ValueError(f"payload of {len(payload)} bytes and its prefix are over the limit of {conn.max_send}")
            flags |= more
            payload = prefix + bytes(payload)
        if self._down is not None:
            return self._buffer(conn, flags, payload)
        if conn.confirms:
            c = conn.publish_confirmation()
            conn._write(_SEND, flags | _CONFIRM_FLAG, c.id, payload)
            self._counts["sent"] += 1
            return c
        mid = conn.next_id()
        conn._write(_SEND, flags, mid, payload)
        self._counts["sent"] += 1
        return Confirmation(None, mid)

    def _buffer(self, conn: Connection, flags: int, payload: Any) -> Confirmation:
        # publish() while reconnecting: kept (bounded) until connected again (_send_buffered)
        if len(self._buffered) >= self._publish_buffer:
            raise QueueFull(f"not connected to broker {self._broker} (the client is reconnecting) and "
                            f"{len(self._buffered)} publishes wait already (publish_buffer): not sent")
        c = Confirmation(conn, 0)
        c._state = None
        self._buffered.append((flags, payload if type(payload) is bytes else bytes(payload), conn._loop.time(), c))
        return c

    @property
    def buffered(self) -> int:
        """publish()es made while reconnecting, waiting to be sent."""
        return len(self._buffered)

    @property
    def unconfirmed(self) -> int:
        """Messages publish()ed the broker has not confirmed yet (buffered ones too)."""
        return (self._conn.unconfirmed if self._conn is not None else 0) + len(self._buffered)

    async def confirmed(self, at_most: int = 0) -> None:
        """Wait until at most ``at_most`` publish()ed messages wait for their confirmation:
        a window of unconfirmed messages, one future per call, none per message.

        Raises:
            ConnectionLost: the connection closed first.
        """
        while True:
            await self._wait_up(None)
            try:
                await self._require().wait_unconfirmed_at_most(at_most)
                return
            except ConnectionLost:
                if self._down is None:
                    raise             # (lost, and reconnecting: wait for the next connection)

    async def ping(self, timeout: float | None = None) -> float:
        """Round trip to the broker; returns the seconds it took.

        The broker answers a PING after it has handled every frame this client sent
        before it, so a completed ping also means every earlier publish() was accepted
        (or refused with an error that has already arrived).

        Raises:
            RequestTimeout: no PONG within ``timeout`` (default: the client's timeout).
            ConnectionLost: the connection closed first.
        """
        limit = self._timeout if timeout is None else timeout
        limit -= await self._wait_up(limit)
        conn = self._require()
        if conn._closing:
            raise conn._lost()
        loop = conn._loop
        pid = conn._next_ping
        conn._next_ping += 1
        fut: asyncio.Future[None] = loop.create_future()
        conn._pings[pid] = fut
        start = loop.time()
        conn._write(_PING, 0, pid, b"")
        try:
            await asyncio.wait_for(fut, limit)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no PONG from the broker within {limit:g} s") from None
        finally:
            conn._pings.pop(pid, None)
        return loop.time() - start

    async def drain(self) -> None:
        """Send what is buffered and wait until the connection takes more.

        Always yields to the event loop (so a publishing loop lets replies and pongs in),
        and returns once the client's unsent bytes are below the transport's low mark and
        the broker does not hold us back. Call it every few hundred publish() or send().

        Raises:
            ConnectionLost: the connection is closed.
        """
        await self._wait_up(None)
        await self._require().drain()

    # -- command scheme ------------------------------------------------------------------

    @property
    def commands(self) -> list[Command] | None:
        """The broker's command schema from WELCOME (asked for by producing clients only).

        None when the broker runs the basic scheme, or for a consumer-only client.
        """
        return self._conn.commands if self._conn is not None else None

    async def collect(self, data: Payload, timeout: float | None = None, *, expect: int | None = None,
                      on_answer: Callable[[bytes], object] | None = None) -> list[bytes]:
        """Send a message and collect every answer until ``timeout`` (fanout commands).

        A fanout command reaches every subscribed consumer and each one answers; the
        producer cannot know how many will, so it collects until its timeout, as the
        original's command-mode producer does.

        Args:
            data: the command string, e.g. ``"version/some_data"``.
            timeout: seconds to collect (default: the client's ``timeout``).
            expect: stop as soon as this many answers have come.
            on_answer: called with each answer as it arrives.

        Returns:
            The answers, in arrival order (empty when nobody answered in time).

        Raises:
            BrokerError: the broker refused the message (e.g. UNKNOWN_COMMAND).
            ConnectionLost: the connection closed first.
        """
        if expect is not None and expect < 1:
            raise ValueError(f"expect must be at least 1, not {expect!r}")
        if self._down is not None:
            given = self._timeout if timeout is None else timeout
            timeout = max(given - await self._wait_up(given), 1e-3)
        conn, payload, timeout = self._prepare(data, timeout)
        fut: asyncio.Future[list[bytes]] = conn._loop.create_future()
        mid = conn.submit_custom(payload, Collector(fut, on_answer, expect), timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            conn.forget(mid)
            raise

    async def _call(self, payload: bytes, flags: int = 0, timeout: float | None = None) -> bytes:
        """A request the broker answers itself: allowed for every role."""
        limit = self._timeout if timeout is None else timeout
        limit -= await self._wait_up(limit)
        conn = self._require()
        if conn._closing:
            raise conn._lost()
        if len(payload) > conn.max_send:
            raise ValueError(f"payload of {len(payload)} bytes is over the limit of {conn.max_send}")
        fut: asyncio.Future[bytes] = conn._loop.create_future()
        mid = conn.submit_custom(payload, fut, max(limit, 1e-3), flags)
        try:
            return await fut
        except asyncio.CancelledError:
            conn.forget(mid)
            raise

    async def subscribe(self, *commands: str) -> None:
        """Subscribe to commands of the broker's schema (consumers; the ``subscribe/<cmd>`` message).

        Subscriptions are remembered and made again by :meth:`connect`.

        Raises:
            BrokerError: UNKNOWN_COMMAND for a name not in the schema; NOT_ALLOWED for a
                client that does not consume, a broker command, or a broker that runs the
                basic scheme (checked here, from WELCOME, before anything is sent).
        """
        for name in commands:
            _check_command_name(name)
        if commands and self.scheme != "command":
            raise BrokerError(int(ErrorCode.NOT_ALLOWED), f"broker {self.address} runs the basic scheme "
                              "(no command schema): nothing to subscribe to")
        for name in commands:
            await self._call(b"subscribe/" + name.encode("utf-8"))
            self._subscriptions[name] = None

    async def unsubscribe(self, *commands: str) -> None:
        """End subscriptions: the broker sends no more of these commands (``unsubscribe/<cmd>``)."""
        for name in commands:
            _check_command_name(name)
            self._subscriptions.pop(name, None)
            await self._call(b"unsubscribe/" + name.encode("utf-8"))

    @property
    def scheme(self) -> str | None:
        """The broker's scheme from WELCOME: ``"command"`` or ``"basic"`` (None before connecting)."""
        return self._conn.scheme if self._conn is not None else None

    @property
    def subscriptions(self) -> list[str]:
        """Commands this client subscribed to (and re-subscribes to on connect)."""
        return list(self._subscriptions)

    async def call_api(self, command: int | str, data: Payload = b"", timeout: float | None = None) -> bytes:
        """Call one of the broker's API commands by number or name: 129 ``hello``, 130 ``msg``.

        ``hello`` answers ``Hello <data>``; ``msg`` feeds ``data`` into the broker as if it
        had been sent normally (no answer from its consumer comes back) and answers ``OK``.
        Works for every role, in both schemes.
        """
        try:
            number = ApiCommand[command.upper()] if isinstance(command, str) else ApiCommand(command)
        except (KeyError, ValueError):
            raise ValueError(f"unknown API command {command!r}: the broker has "
                             f"{', '.join(f'{int(c)} {c.name.lower()}' for c in ApiCommand)}") from None
        return await self._call(bytes((number,)) + bytes(_to_payload(data)), _API, timeout)

    async def hello(self, data: Payload) -> bytes:
        """API command 129: the broker answers ``Hello <data>``."""
        return await self.call_api(ApiCommand.HELLO, data)


def _check_command_name(name: object) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a command name is a non-empty str without '/', not {name!r}")


class Producer(Client):
    """A client that sends messages and receives their answers.

    Example::

        async with Producer("<address>@127.0.0.1:7050") as p:
            answer = await p.request(b"Hello world #1!")
    """

    def __init__(self, broker: BrokerSpec, *, name: str | None = None, timeout: float = 5.0,
                 max_payload: int | None = None,
                 on_refused: Callable[[int, BrokerError], None] | None = None, reconnect: bool = True,
                 reconnect_delay: float = RECONNECT_DELAY, reconnect_max_delay: float = RECONNECT_MAX_DELAY,
                 reconnect_tries: int = 0, publish_buffer: int = PUBLISH_BUFFER,
                 on_connection: Callable[[bool, str], None] | None = None) -> None:
        super().__init__(broker, name=name, role="producer", timeout=timeout, max_payload=max_payload,
                         on_refused=on_refused, reconnect=reconnect, reconnect_delay=reconnect_delay,
                         reconnect_max_delay=reconnect_max_delay, reconnect_tries=reconnect_tries,
                         publish_buffer=publish_buffer, on_connection=on_connection)


class Consumer(Client):
    """A client that processes messages delivered by the broker and answers them.

    ``handler(data)`` may be a plain function or a coroutine function (or return an
    awaitable). It returns the answer: bytes, bytearray, memoryview or str (sent
    UTF-8), or None to acknowledge without an answer (ANSWER with NO_ANSWER; the
    producer then gets no reply and times out). A plain handler runs inline in the
    read path; an async one runs as a task, at most ``prefetch`` at once. A handler that
    declares a second parameter, ``handler(data, ctx)``, gets a :class:`DeliveryContext`
    (attempt number, handler time left, cancelled); plain handlers pay nothing for it.

    Outcomes (docs/semantics.md): raise :class:`teomq.Retry` (``delay`` seconds, or the
    broker's backoff) to have the message delivered again later, behind the others of its
    queue; raise :class:`teomq.Reject` to send it to the dead-letter queue at once (its
    producer gets :class:`teomq.Rejected`). Any other exception (or another return type, or
    an answer over the payload limit) is logged on the ``teomq.consumer`` logger, counted in
    ``stats["errors"]`` and retried with the broker's backoff; after the broker's
    ``max_deliveries`` failures the message is dead-lettered, never looped forever.

    **Leases.** While an async handler runs, the client extends its delivery's lease (one
    TOUCH frame per connection every third of the broker's lease, with every running
    delivery's id), up to ``max_handler_time`` seconds (default 600): past it the handler is
    cancelled and the message goes to another consumer when the lease runs out. A sync
    handler blocks the event loop: it must return within the lease.

    With ``producer=True`` the consumer may also call :meth:`request`,
    :meth:`send` and :meth:`publish` on the same connection.

    **Command scheme.** Register a handler per command with :meth:`command`; it gets a
    :class:`~teomq.commands.CommandCall` (name, vars from the pattern, data) and the
    consumer subscribes to the command when it connects. ``handler``, if given, then
    handles the commands that have no handler of their own.

    Example::

        async with Consumer(":7050", lambda data: b"Answer to " + data) as c:
            await c.wait_closed()

        consumer = Consumer(":7050")

        @consumer.command("version", "the app's version", pattern="{data}/{description}")
        def version(cmd):
            return f"version: 1.0, data: {cmd.vars['data']}"
    """

    def __init__(self, broker: BrokerSpec, handler: Handler | None = None, *, name: str | None = None,
                 prefetch: int = 64, producer: bool = False, timeout: float = 5.0,
                 max_payload: int | None = None,
                 on_refused: Callable[[int, BrokerError], None] | None = None,
                 max_handler_time: float = DEFAULT_MAX_HANDLER_TIME, reconnect: bool = True,
                 reconnect_delay: float = RECONNECT_DELAY, reconnect_max_delay: float = RECONNECT_MAX_DELAY,
                 reconnect_tries: int = 0, publish_buffer: int = PUBLISH_BUFFER,
                 on_connection: Callable[[bool, str], None] | None = None) -> None:
        self._fallback = handler
        self._schema = CommandSchema(reserve_broker_names=False)
        self._command_handlers: list[Callable[..., Any]] = []
        self._command_ctx: list[bool] = []   # that handler takes a DeliveryContext too
        super().__init__(broker, name=name, role="both" if producer else "consumer",
                         prefetch=prefetch, handler=handler if handler is not None else self._dispatch,
                         timeout=timeout, max_payload=max_payload, on_refused=on_refused,
                         max_handler_time=max_handler_time, reconnect=reconnect, reconnect_delay=reconnect_delay,
                         reconnect_max_delay=reconnect_max_delay, reconnect_tries=reconnect_tries,
                         publish_buffer=publish_buffer, on_connection=on_connection)

    def command(self, name: str, description: str = "", pattern: str = "", *,
                subscribe: bool = True) -> Callable[[Callable[[CommandCall], Any]], Callable[[CommandCall], Any]]:
        """Decorator: handle command ``name`` (parsed with ``pattern``) with the decorated function.

        The function gets a :class:`~teomq.commands.CommandCall` and returns the answer
        like a handler (it may be async). With ``subscribe`` (the default) the consumer
        subscribes to the command on connect. Register commands before connecting: one
        registered while connected is subscribed only at the next connect, and when a
        ``handler`` was given to the constructor it keeps receiving every message until then.
        """
        def register(fn: Callable[[CommandCall], Any]) -> Callable[[CommandCall], Any]:
            if not callable(fn):
                raise TypeError("a command handler must be callable")
            if self._fallback is not None and self._handler is self._fallback:
                self._handler = self._dispatch  # commands now go through the schema first
                self._handler_async = False
            self._schema.add(name, description, pattern)
            self._command_handlers.append(fn)
            self._command_ctx.append(_takes_context(fn))
            if self._command_ctx[-1] or (self._fallback is not None and _takes_context(self._fallback)):
                self._wants_context = True  # _dispatch passes it on
            if subscribe:
                self._subscriptions[name] = None
            return fn
        return register

    def _dispatch(self, data: bytes, ctx: DeliveryContext | None = None) -> Any:
        """Handler of a command consumer: parse with the schema (in C), call the command's handler."""
        try:
            idx, call = self._schema.parse_indexed(data)
        except UnknownCommand as exc:
            if self._fallback is not None:
                return self._fallback(data, ctx) if ctx is not None and _takes_context(self._fallback) \
                    else self._fallback(data)
            consumer_log.warning("%s: no handler for command '%s'; acknowledged without an answer",
                                 self.name, exc.name[:256].decode("utf-8", "replace"))
            return None
        if ctx is not None and self._command_ctx[idx]:
            return self._command_handlers[idx](call, ctx)
        return self._command_handlers[idx](call)

    @property
    def schema(self) -> CommandSchema:
        """The commands this consumer handles."""
        return self._schema

    async def start(self) -> None:
        """Connect and start consuming (same as :meth:`connect`)."""
        await self.connect()
