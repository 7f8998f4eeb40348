"""Type stub of the compiled teomq._core.inproc (inproc.pyx): endpoints inside the broker."""

from collections.abc import Callable

from _typeshed import ReadableBuffer
from typing import SupportsIndex

from teomq._core.dispatch import Dispatcher
from teomq._core.endpoint import Endpoint

#: what on_output gets: (frame type, flags, id, payload), nothing encoded
_Output = tuple[int, int, int, bytes]

#: on_output's item type for a run of stream pushes taken in C: (PUSHES, count, 0, joined pushes)
PUSHES: int

class PushCache:
    """The encoded stream push of recent messages: ``encode(payload) -> (name, push)``, once per message."""

    def __init__(self, encode: Callable[[bytes], tuple[bytes, bytes]]) -> None: ...

def release_held_many(endpoints: list[InprocEndpoint | None], start: int,
                      budget: int) -> tuple[int, int, BaseException | None]:
    """Acknowledge the held ids of ``endpoints[start:]`` in turn until ``budget`` are fed; one pump.

    Returns ``(fed, stop, error)``: ``stop`` the first endpoint not done, ``error`` what it raised.
    """

class InprocEndpoint(Endpoint):
    """A consumer and producer inside the broker, fed and answered without wire frames."""

    def __init__(self, disp: Dispatcher, on_output: Callable[[list[_Output]], object], *,
                 prefetch: int = 0, session: bytes | None = None) -> None: ...
    def on_command(self, kind: int, fid: int, flags: int, data: bytes) -> None: ...
    def answer(self, delivery_id: SupportsIndex, payload: ReadableBuffer = b"", *,
               no_answer: bool = False) -> None:
        """Answer (or, with no_answer, just acknowledge) a delivery this endpoint holds."""
    def ack(self, delivery_ids: list[int]) -> None:
        """Acknowledge (no answer relayed) each delivery of ``delivery_ids``, in order; one pump and flush."""
    def send(self, msg_id: SupportsIndex, payload: ReadableBuffer, *, no_reply: bool = False,
             api: bool = False) -> None:
        """Send a message as a producer would; its answer comes to on_output as a REPLY.

        ``api``: an API send (payload ``[u8 API command][data]``: 129 hello, 130 msg).
        """
    def set_pushes(self, cache: PushCache | None, streams: set[bytes] | frozenset[bytes] | None) -> None:
        """Take deliveries whose command name is in ``streams`` as stream pushes (PUSHES items, ids held)."""
    def hold_acks(self, delivery_ids: list[int]) -> None:
        """Hold these deliveries' ids, after those already held, for release_held()."""
    @property
    def n_held(self) -> int:
        """Delivery ids held for acknowledging."""
    def release_held(self, limit: int) -> int:
        """Acknowledge up to ``limit`` held ids, oldest first; one pump and flush; returns how many."""
    def release_sends(self) -> None:
        """Accept the parked sends, in order, until hold_sends is set again; then deliver."""
    @property
    def parked_sends(self) -> int:
        """Sends held back, not yet accepted."""
    def put_output(self, ftype: SupportsIndex, flags: SupportsIndex, fid: SupportsIndex,
                   payload: ReadableBuffer = b"") -> None:
        """Queue ``(ftype, flags, fid, payload)`` for on_output after what is pending (the next flush)."""
    def flush_now(self) -> None:
        """Hand what is pending to on_output at once (before closing this endpoint)."""
    def close(self) -> None:
        """Leave: what it holds is requeued, its subscriptions end, its parked sends are dropped. Idempotent."""
