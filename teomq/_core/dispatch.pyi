"""Type stub of the compiled teomq._core.dispatch (dispatch.pyx): accepting messages, the
bound, command mode; the scheduler below it (scheduler.pyx) routes and delivers.

Every hook that receives an endpoint gets the control plane's subclass of CoreConnection (or
an InprocEndpoint), hence ``Any`` for it in the callbacks below.
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final, TypedDict, final

from _typeshed import ReadableBuffer

from teomq._core.seglog import SegmentLog
from typing import SupportsIndex

from teomq._core.command_parser import CommandTable
from teomq._core.endpoint import Endpoint
from teomq._core.scheduler import Scheduler

#: on_command kinds besides the RouteKind values: not a command, not an API command
CMD_UNKNOWN: Final = 0
CMD_UNKNOWN_API: Final = -1

_RouteStats = TypedDict("_RouteStats", {
    "name": bytes, "routing": str, "queued": int, "subscribers": int, "in": int, "out": int, "bytes": int,
    "refused": int,
})

@final
class Dispatcher(Scheduler):
    """The broker's shared state: endpoints, routes, flights, the bound, output to flush."""

    def __init__(
        self,
        *,
        max_payload: int = 1048576,
        queue_max: int = 1000000,
        scheduler: Callable[[Callable[[], object]], object] | None = None,
        backlog_max: int = 10000,
        lease: float = 0.0,
        run: int = 16,
    ) -> None: ...
    #: per accepted message, when set: ``on_message(conn, msg_id, payload)``
    on_message: Callable[[Any, int, bytes], object] | None
    #: ``on_backpressure(True)`` above the high mark of held messages, ``(False)`` back at the low one
    on_backpressure: Callable[[bool], object] | None
    #: a SEND was refused since refusal_noted was cleared
    on_refused: Callable[[], object] | None
    refusal_noted: bool
    @property
    def queue_max(self) -> int:
        """What the broker may hold for producers: waiting or in flight."""
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
    def n_in(self) -> int: ...
    @property
    def n_refused(self) -> int: ...
    @property
    def table(self) -> CommandTable | None:
        """The schema's command table; None in the basic scheme."""
    @property
    def n_unknown_commands(self) -> int: ...
    def flush(self) -> None:
        """Write every connection's pending output: one write per connection per loop pass."""
    def set_scheduler(self, scheduler: Callable[[Callable[[], object]], object] | None) -> None: ...
    def pump_now(self) -> None:
        """Deliver what can be delivered and schedule the flush (after control-plane changes)."""
    def tick(self, now: float) -> None:
        """The clock moves on to ``now`` (seconds): leases that ran out by then expire."""
    def bind_session(self, conn: Endpoint, name: bytes) -> bool:
        """Name ``conn``'s session; False when another connected endpoint has that session."""
    def session_of(self, name: bytes) -> Endpoint | None:
        """The endpoint whose session has this name, or None."""
    def set_store(self, log: SegmentLog) -> None:
        """Keep the queues in ``log`` (recovered) instead of in memory; before anything connects."""
    def restore(self) -> tuple[int, int]:
        """Put the store's recovered live messages back in their routes: (restored, kept on disk)."""
    def set_schema(self, table: CommandTable, kinds: Sequence[int]) -> None:
        """Switch to command mode: ``kinds[i]`` is the RouteKind of ``table``'s command i."""
    def subscribe(self, conn: Endpoint, name: str | ReadableBuffer) -> int:
        """0 subscribed, 1 already was, -1 not a command of the schema, -2 a broker command."""
    def unsubscribe(self, conn: Endpoint, name: str | ReadableBuffer) -> int:
        """0 done, 1 there was none, -1 unknown name, -2 broker command."""
    def subscriptions_of(self, conn: Endpoint) -> list[bytes]:
        """Names of the commands ``conn`` is subscribed to (none in the basic scheme)."""
    def route_stats(self) -> list[_RouteStats]:
        """Per command: name, routing, queued, subscribers, in, out, bytes (waiting), refused (at its limits)."""
    def set_limits(self, idx: int, max_messages: int, max_bytes: int) -> None:
        """Limits on what waits in route ``idx`` (0: none); past them a SEND gets QUEUE_FULL."""
    def set_delivery(self, *, lease: float = -1.0, max_deliveries: int = -1, max_crashes: int = -1,
                     retry_base: float = -1.0, retry_max: float = -1.0, realtime: bool = False) -> None:
        """The broker's delivery guarantees (docs/semantics.md); one left out keeps its value."""
    def set_route_delivery(self, idx: int, *, lease: float = 0.0, max_deliveries: int = 0,
                           max_crashes: int = 0, priority: int = 0, ttl: float = 0.0,
                           dead_letter_expired: bool = False) -> None:
        """Route ``idx``'s own lease, max_deliveries, max_crashes (0: the broker's); the priority
        (0-7) and time to live (seconds, 0: none) of its messages that name none; whether an
        expired one is dead-lettered."""
    def route_lease_of(self, idx: int) -> float:
        """The lease route ``idx``'s deliveries get (0: none)."""
    def min_lease(self) -> float:
        """The shortest lease of any route (0: none): WELCOME's ``lease``."""
    def replay(self, idx: int, payload: ReadableBuffer) -> bool:
        """A new message of no producer into route ``idx`` (a dead letter put back); False: refused now."""
    @property
    def n_no_consumer(self) -> int:
        """SENDs flagged FAIL_FAST refused: nobody consumed their queue."""
    def compact(self) -> tuple[int, int]:
        """Copy forward the live messages of the segment the log chose to empty: (copied, left)."""
    #: payload bytes all routes may have waiting (0: none)
    queue_max_bytes: int
    @property
    def n_limit_refused(self) -> int:
        """SENDs refused at a queue's limits or queue_max_bytes."""
    def stats(self) -> dict[str, int]: ...
