"""Type stub of the compiled teomq._core.dispatch (dispatch.pyx): the broker's dispatch loop.

The control plane (teomq/broker.py) subclasses CoreConnection (mixing in
asyncio.BufferedProtocol) and overrides its hooks; every hook that receives a connection gets
that subclass, hence ``Any`` for it in the callbacks below.
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final, TypedDict, final

from _typeshed import ReadableBuffer
from typing import SupportsIndex

from teomq._core.command_parser import CommandTable
from teomq._core.ring_queue import MsgRing
from teomq.errors import ProtocolError as ProtocolError

#: on_command kinds besides the RouteKind values: not a command, not an API command
CMD_UNKNOWN: Final = 0
CMD_UNKNOWN_API: Final = -1

class CoreConnection:
    """One client connection as the core sees it (its read path, output buffer and credit)."""

    def __init__(self, disp: Dispatcher, *args: Any, **kwargs: Any) -> None: ...
    @property
    def slot(self) -> int: ...
    @property
    def gen(self) -> int: ...
    @property
    def state(self) -> int:
        """0 no HELLO yet, 1 handshake done, 2 detached."""
    @property
    def consumer(self) -> bool: ...
    @property
    def credit(self) -> int: ...
    @property
    def prefetch(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    transport: asyncio.Transport | None
    @property
    def slow_dropped(self) -> int:
        """Fanout copies dropped because its backlog was full."""
    #: while set, whole SEND frames are parked in the core, in order, and accepted later
    hold_sends: bool
    @property
    def n_parked(self) -> int: ...
    @property
    def n_refused(self) -> int:
        """Its SENDs refused QUEUE_FULL: the bound reached."""
    @property
    def n_refused_parked(self) -> int:
        """Its SENDs refused QUEUE_FULL: held back, and its parked SENDs over their bound."""
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def release_sends(self) -> None:
        """Accept the parked SENDs, in order, until hold_sends is set again; then deliver."""
    @property
    def parked_sends(self) -> int:
        """SENDs held back, not yet accepted."""
    def send_frame(self, ftype: SupportsIndex, flags: SupportsIndex, fid: SupportsIndex,
                   payload: ReadableBuffer = b"") -> None:
        """Queue a frame to this connection (written with the next flush)."""
    def set_socket(self, fd: int) -> None:
        """Let flush() write to this socket directly (-1: always go through the transport)."""
    def flush_now(self) -> None:
        """Write this connection's pending output at once (before closing it)."""
    def accept_hello(self, consumer: bool, prefetch: int) -> None:
        """Mark the handshake done; a consumer starts with ``prefetch`` credits."""
    def detach(self) -> None:
        """The connection is gone or being closed: requeue its in-flight messages, free its slot."""
    def on_control(self, ftype: int, flags: int, fid: int, payload: bytes) -> None:
        """Hook: a HELLO or ERROR frame, and every frame before the handshake."""
    def on_protocol_error(self, exc: ProtocolError) -> None:
        """Hook: bad input from this connection (the default detaches it)."""
    def on_internal_error(self, exc: Exception) -> None:
        """Hook: something other than ProtocolError was raised while its frame was handled."""
    @property
    def handshaken(self) -> bool: ...
    @property
    def detached(self) -> bool: ...
    def on_command(self, kind: int, fid: int, flags: int, data: bytes) -> None:
        """Hook: a SEND the broker answers itself (kind: a RouteKind, CMD_UNKNOWN or CMD_UNKNOWN_API)."""
    @property
    def subscriptions(self) -> list[bytes]:
        """Names of the commands this connection is subscribed to."""
    @property
    def pending_output(self) -> int: ...

_RouteStats = TypedDict("_RouteStats", {
    "name": bytes, "routing": str, "queued": int, "subscribers": int, "in": int, "out": int,
})

@final
class Dispatcher:
    """The broker's shared state: connections, the queue, in-flight messages, output to flush."""

    def __init__(
        self,
        *,
        max_payload: int = 1048576,
        queue_max: int = 1000000,
        scheduler: Callable[[Callable[[], object]], object] | None = None,
        backlog_max: int = 10000,
    ) -> None: ...
    @property
    def queue(self) -> MsgRing: ...
    #: per accepted message, when set: ``on_message(conn, msg_id, payload)``
    on_message: Callable[[Any, int, bytes], object] | None
    #: ``on_backpressure(True)`` above the high mark of held messages, ``(False)`` back at the low one
    on_backpressure: Callable[[bool], object] | None
    #: a SEND was refused since refusal_noted was cleared
    on_refused: Callable[[], object] | None
    refusal_noted: bool
    @property
    def queue_high(self) -> int: ...
    @property
    def queue_low(self) -> int: ...
    @property
    def queue_mid(self) -> int:
        """Between queue_low and queue_high (see pump())."""
    @property
    def parked_bytes(self) -> int:
        """SEND frames parked by held-back connections, all together."""
    @property
    def backpressure(self) -> bool: ...
    @property
    def max_payload(self) -> int: ...
    @property
    def consumers(self) -> int: ...
    @property
    def n_in(self) -> int: ...
    @property
    def n_out(self) -> int: ...
    @property
    def n_answered(self) -> int: ...
    @property
    def n_orphaned(self) -> int: ...
    @property
    def n_redelivered(self) -> int: ...
    @property
    def n_refused(self) -> int: ...
    @property
    def n_unknown_answers(self) -> int: ...
    @property
    def n_inflight(self) -> int: ...
    @property
    def n_copies_inflight(self) -> int: ...
    @property
    def table(self) -> CommandTable | None:
        """The schema's command table; None in the basic scheme."""
    @property
    def n_route_queued(self) -> int: ...
    @property
    def n_backlog(self) -> int: ...
    @property
    def backlog_max(self) -> int: ...
    #: a consumer's fanout backlog got full: ``on_slow_consumer(conn, route name)``
    on_slow_consumer: Callable[[Any, bytes], object] | None
    @property
    def n_dropped(self) -> int: ...
    @property
    def n_unknown_commands(self) -> int: ...
    def flush(self) -> None:
        """Write every connection's pending output: one write per connection per loop pass."""
    def set_scheduler(self, scheduler: Callable[[Callable[[], object]], object] | None) -> None: ...
    def pump_now(self) -> None:
        """Deliver what can be delivered and schedule the flush (after control-plane changes)."""
    def set_schema(self, table: CommandTable, kinds: Sequence[int]) -> None:
        """Switch to command mode: ``kinds[i]`` is the RouteKind of ``table``'s command i."""
    def subscribe(self, conn: CoreConnection, name: str | ReadableBuffer) -> int:
        """0 subscribed, 1 already was, -1 not a command of the schema, -2 a broker command."""
    def unsubscribe(self, conn: CoreConnection, name: str | ReadableBuffer) -> int:
        """0 done, 1 there was none, -1 unknown name, -2 broker command."""
    def route_stats(self) -> list[_RouteStats]:
        """Per command: name, routing, queued, subscribers, in, out."""
    def stats(self) -> dict[str, int]: ...
