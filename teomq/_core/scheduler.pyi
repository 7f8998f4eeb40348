"""Type stub of the compiled teomq._core.scheduler (scheduler.pyx): one scheduler for every
route (the basic scheme's queue is route 0), flights with leases, answers to sessions."""

from collections.abc import Callable
from typing import Any

from teomq._core.endpoint import Outbox
from teomq._core.store import Store

#: why a message was dead-lettered, by the core's number
DEAD_REASONS: dict[int, str]

class Scheduler:
    """Routes, subscriptions, flights and the endpoint and session tables."""

    def __init__(self, *args: Any, backlog_max: int = 10000, lease: float = 0.0, run: int = 16,
                 **kwargs: Any) -> None: ...
    @property
    def store(self) -> Store: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def basic(self) -> bool:
        """The basic scheme: every consumer takes from route 0."""
    @property
    def lease(self) -> float:
        """Seconds a delivery may stay unanswered (0: no lease)."""
    @property
    def run(self) -> int:
        """Most consecutive messages of a queue route one consumer takes (its free credit bounds it too)."""
    @property
    def now(self) -> float:
        """The clock, as of the last tick()."""
    #: no new deliveries from queue routes or fanout backlogs (a broker shutting down)
    paused: bool
    #: memory budget of waiting messages in bytes (0: none); past it a durable store's are paged out
    mem_max: int
    @property
    def mem_queued(self) -> int:
        """Memory waiting messages hold (their slots, payload blocks and payloads)."""
    @property
    def q_bytes(self) -> int:
        """Payload bytes waiting in all routes."""
    @property
    def d_bytes(self) -> int:
        """Payload bytes of the delayed messages (not due yet)."""
    @property
    def n_paged_out(self) -> int: ...
    @property
    def n_paged_in(self) -> int: ...
    @property
    def consumers(self) -> int: ...
    @property
    def n_route_queued(self) -> int: ...
    @property
    def n_backlog(self) -> int: ...
    @property
    def backlog_max(self) -> int: ...
    #: a consumer's fanout backlog got full: ``on_slow_consumer(endpoint, route name)``
    on_slow_consumer: Callable[[Any, bytes], object] | None
    @property
    def n_out(self) -> int: ...
    @property
    def n_answered(self) -> int: ...
    @property
    def n_orphaned(self) -> int: ...
    @property
    def n_redelivered(self) -> int: ...
    @property
    def n_expired(self) -> int: ...
    @property
    def n_unknown_answers(self) -> int: ...
    @property
    def n_inflight(self) -> int: ...
    @property
    def n_copies_inflight(self) -> int: ...
    @property
    def n_dropped(self) -> int: ...
    # delivery guarantees (docs/semantics.md); Dispatcher.set_delivery sets them
    @property
    def epoch(self) -> float:
        """The clock's origin for message deadlines."""
    #: the clock is read at every read (the broker), not only moved by tick()
    realtime: bool
    @property
    def max_deliveries(self) -> int: ...
    @property
    def max_crashes(self) -> int: ...
    @property
    def retry_base(self) -> float: ...
    @property
    def retry_max(self) -> float: ...
    @property
    def n_delayed(self) -> int:
        """Messages waiting for their time: a delay, a retry's."""
    @property
    def n_delayed_out(self) -> int:
        """Of them, paged out (only their index entries in memory)."""
    @property
    def n_delayed_in(self) -> int:
        """Messages accepted with a delay."""
    #: the pass's dead letters, stored before their messages leave: ``on_dead(list of dicts)``;
    #: raising keeps them (tried again a second later)
    on_dead: Callable[[list[dict[str, Any]]], object] | None
    @property
    def n_nacked(self) -> int: ...
    @property
    def n_crashed(self) -> int: ...
    @property
    def n_dead(self) -> int: ...
    @property
    def n_rejected(self) -> int: ...
    @property
    def n_deadline_expired(self) -> int: ...
    @property
    def n_cancelled(self) -> int: ...
    @property
    def n_touched(self) -> int: ...
    @property
    def n_late_answers(self) -> int: ...
    @property
    def n_suspects(self) -> int:
        """Messages waiting to be delivered alone (held when a consumer died or lapsed)."""
