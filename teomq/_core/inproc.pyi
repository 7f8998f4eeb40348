"""Type stub of the compiled teomq._core.inproc (inproc.pyx): endpoints inside the broker."""

from collections.abc import Callable

from _typeshed import ReadableBuffer
from typing import SupportsIndex

from teomq._core.dispatch import Dispatcher
from teomq._core.endpoint import Endpoint

#: what on_output gets: (frame type, flags, id, payload), nothing encoded
_Output = tuple[int, int, int, bytes]

class InprocEndpoint(Endpoint):
    """A consumer and producer inside the broker, fed and answered without wire frames."""

    def __init__(self, disp: Dispatcher, on_output: Callable[[list[_Output]], object], *,
                 prefetch: int = 0, session: bytes | None = None) -> None: ...
    def on_command(self, kind: int, fid: int, flags: int, data: bytes) -> None: ...
    def answer(self, delivery_id: SupportsIndex, payload: ReadableBuffer = b"", *,
               no_answer: bool = False) -> None:
        """Answer (or, with no_answer, just acknowledge) a delivery this endpoint holds."""
    def send(self, msg_id: SupportsIndex, payload: ReadableBuffer, *, no_reply: bool = False) -> None:
        """Send a message as a producer would; its answer comes to on_output as a REPLY."""
    def close(self) -> None:
        """Leave: what it holds is requeued, its subscriptions end. Idempotent."""
