"""Type stub of the compiled teomq._core.endpoint (endpoint.pyx): what the scheduler delivers
to (a wire connection or an in-process endpoint) and the outbox flushed once per loop pass."""

from collections.abc import Callable
from typing import final

from teomq._core.msglog import MessageLog

@final
class Outbox:
    """The endpoints with output to hand over, flushed once per loop pass."""

    def __init__(self, scheduler: Callable[[Callable[[], object]], object] | None = None) -> None: ...
    def set_scheduler(self, scheduler: Callable[[Callable[[], object]], object] | None) -> None: ...
    def set_message_log(self, msglog: MessageLog | None) -> None:
        """Log every accepted message in C (Dispatcher.enqueue adds its line) and write the lines
        at each flush, instead of the dispatcher's on_message; None: back to on_message."""
    def flush(self) -> None:
        """Hand every endpoint's pending output over: one write per endpoint per loop pass.

        The per-message log lines of the pass are written first, in one write."""

class Endpoint:
    """A peer as the scheduler sees it: slot, state, session, credit, flights, subscriptions."""

    @property
    def slot(self) -> int: ...
    @property
    def gen(self) -> int: ...
    @property
    def session(self) -> int:
        """Handle of its producer session (0 until ready)."""
    @property
    def session_name(self) -> bytes | None:
        """The name its HELLO gave the session, or None."""
    #: its name in the per-message log line (UTF-8, one line)
    log_name: bytes | None
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
    @property
    def lapsed(self) -> int:
        """Deliveries whose lease expired: credit it gets back as it answers."""
    @property
    def withheld(self) -> int:
        """Credit taken away when a lease expired (or a suspect was given it alone): back with its next answer."""
    @property
    def proven(self) -> bool:
        """It has answered a delivery."""
    #: it announced "cancel" / "lease" (HELLO caps)
    cancels: bool
    leases: bool
    @property
    def slow_dropped(self) -> int:
        """Fanout copies dropped because its backlog was full."""
    #: while set, whole SEND frames are parked in the core, in order, and accepted later
    hold_sends: bool
    @property
    def n_refused(self) -> int:
        """Its SENDs refused QUEUE_FULL: the bound reached."""
    @property
    def n_refused_parked(self) -> int:
        """Its SENDs refused QUEUE_FULL: held back, and its parked SENDs over their bound."""
    #: it announced the "confirm" capability: its SENDs flagged CONFIRM get CONFIRM frames
    confirms: bool
    @property
    def n_confirmed(self) -> int:
        """Its SENDs flagged CONFIRM confirmed (in CONFIRM frames sent)."""
    @property
    def handshaken(self) -> bool: ...
    @property
    def detached(self) -> bool: ...
