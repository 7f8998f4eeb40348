"""Type stub of the compiled teomq._core.routes (routes.pyx): command routes of the broker."""

from typing import final

from teomq._core.ring_queue import MsgRing

#: RouteKind by name, for the control plane (Dispatcher.set_schema takes these values)
KINDS: dict[str, int]

@final
class Route:
    """One command of the broker's schema: its waiting queue and its subscribers."""

    def __init__(self, index: int, name: bytes, kind: int) -> None: ...
    @property
    def index(self) -> int: ...
    @property
    def name(self) -> bytes: ...
    @property
    def kind(self) -> int: ...
    @property
    def lanes(self) -> tuple[MsgRing, ...]:
        """Messages no subscriber could take yet, in memory: a FIFO per priority level (0-7)."""
    @property
    def n_waiting(self) -> int:
        """Waiting in memory, every level."""
    @property
    def n_spilled(self) -> int:
        """Waiting paged out, every level."""
    def level_counts(self) -> list[int]:
        """Waiting at each level (in memory and paged out), the lowest first."""
    #: of its messages that name none: their priority, time to live (ms, 0: none); whether an
    #: expired one is dead-lettered
    default_priority: int
    ttl_ms: int
    dead_letter_expired: bool
    @property
    def nmembers(self) -> int: ...
    @property
    def n_in(self) -> int:
        """Messages routed here."""
    @property
    def n_out(self) -> int:
        """Deliveries made from here."""
    @property
    def queued(self) -> int:
        """Waiting messages, in memory and paged out."""
    @property
    def paged_out(self) -> int:
        """Waiting messages paged out to the durable log."""
    #: limits on what waits here (0: none)
    max_messages: int
    max_bytes: int
    #: its own delivery guarantees (0: the broker's)
    lease: float
    max_deliveries: int
    max_crashes: int
    @property
    def suspects(self) -> MsgRing:
        """Messages held when a consumer died or lapsed: each is delivered alone."""
    @property
    def q_bytes(self) -> int:
        """Payload bytes waiting here."""
    @property
    def n_delayed(self) -> int:
        """Messages for here in the heap of delayed ones (not due yet)."""
    @property
    def d_bytes(self) -> int:
        """Their payload bytes (its limits count them)."""
    @property
    def n_refused(self) -> int:
        """SENDs refused at its limits."""
    @property
    def routing(self) -> str:
        """"fanout", "queue" or "broker"."""

@final
class SubTable:
    """All subscriptions, in one array with a free list; ids are stable while used."""

    def __init__(self) -> None: ...
    @property
    def used(self) -> int: ...
