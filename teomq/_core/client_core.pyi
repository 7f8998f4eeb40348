"""Type stub of the compiled teomq._core.client_core (client_core.pyx): a client connection's read path."""

import asyncio
from collections.abc import Callable
from typing import SupportsIndex, TypeAlias, final

from _typeshed import ReadableBuffer

from teomq._core.frame_codec import FrameDecoder, WriteBuffer
from teomq._core.writer import SocketWriter

#: What the core resolves per REPLY: a Future gets ``set_result(answer)``, a send() callback
#: is called ``(id, answer, None)``.
_Entry: TypeAlias = asyncio.Future[bytes] | Callable[[int, bytes, None], object]

@final
class ClientCore(FrameDecoder):
    """Handles every frame of one socket read: REPLYs and (with a sync handler) DELIVERs in C."""

    def __init__(
        self,
        max_payload: SupportsIndex,
        on_frame: Callable[[int, int, int, bytes], object],
        on_result: Callable[[int, bytes, object, Exception | None], object],
        on_callback_error: Callable[[int, Exception], object],
    ) -> None:
        """``on_frame(ftype, flags, fid, payload)`` gets every frame the core does not handle;
        ``on_result(did, payload, result, exc)`` a sync handler's result that is not plain bytes
        within ``max_send``, or its exception; ``on_callback_error(id, exc)`` a send() callback's."""
    @property
    def wbuf(self) -> WriteBuffer:
        """The output buffer: what the owner writes once per loop pass."""
    @property
    def next_id(self) -> int: ...
    @property
    def npending(self) -> int: ...
    #: sync consumer handler: its plain-bytes result is encoded as the ANSWER
    handler: Callable[[bytes], object] | None
    max_send: int
    #: requests carry this deadline in ms (SEND flag DEADLINE); 0: none
    deadline_ms: int
    @property
    def sent(self) -> int: ...
    @property
    def replies(self) -> int: ...
    @property
    def received(self) -> int: ...
    @property
    def answered(self) -> int: ...
    @property
    def redelivered(self) -> int: ...
    #: send() may take its fast path: connected, not held back, not closing, may produce
    fast: bool
    #: a flush of wbuf is scheduled this loop pass (send() schedules one while it is clear)
    flush_scheduled: bool
    #: the request-deadline timer runs (send() calls arm_cb while it is clear)
    timer_armed: bool
    def set_scheduling(self, call_soon: Callable[[Callable[[], object]], object], flush_cb: Callable[[], object],
                       arm_cb: Callable[[], object]) -> None:
        """How send() schedules this loop pass's flush and the deadline timer."""
    def send(self, payload: object, entry: _Entry, is_future: bool) -> int:
        """A request with the default timeout in one call (tracked, encoded, flush and timer
        scheduled), or -1, nothing done, unless ``fast`` is set, ``payload`` is bytes within
        max_send and ``entry`` a Future (``is_future``) or callable."""
    def take_id(self) -> int:
        """A fresh message id that is not tracked here (publish, or a custom-timeout request)."""
    def submit(self, payload: bytes, entry: _Entry, is_future: bool) -> int:
        """register(entry) and encode its SEND frame in one call."""
    def register(self, entry: _Entry, is_future: bool) -> int:
        """Track ``entry`` under a fresh message id."""
    def pop(self, mid: SupportsIndex) -> _Entry | None:
        """Stop tracking ``mid``; return its entry or None."""
    def expire_upto(self, last: SupportsIndex) -> list[tuple[int, _Entry]]:
        """Remove and return ``[(id, entry), ...]`` for every tracked id <= last, in id order."""
    def take_all(self) -> list[tuple[int, _Entry]]:
        """Remove and return every tracked ``(id, entry)``, in id order (connection lost)."""
    def feed(self, data: ReadableBuffer) -> None:  # type: ignore[override]  # handles frames, lists none
        """Handle every complete frame of ``data`` (one socket read). Raises ProtocolError."""
    @property
    def writer(self) -> SocketWriter | None: ...
    def set_writer(self, writer: SocketWriter | None) -> None:
        """Let write_out() send to the socket through ``writer`` (None: always the transport)."""
    def write_out(self, transport: asyncio.WriteTransport) -> None:
        """Write the output buffer: one send(), the transport only for what the socket refuses."""
    def poison(self, exc: BaseException) -> None:
        """Stop handling input (the owner is closing the connection for ``exc``)."""
