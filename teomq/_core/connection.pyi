"""Type stub of the compiled teomq._core.connection (connection.pyx): a wire connection's read
loop, output buffer and held-back SENDs.

The control plane (teomq/broker.py) subclasses CoreConnection (mixing in
asyncio.BufferedProtocol) and overrides its hooks.
"""

import asyncio
from typing import Any

from _typeshed import ReadableBuffer
from typing import SupportsIndex

from teomq._core.dispatch import Dispatcher
from teomq._core.endpoint import Endpoint
from teomq._core.writer import SocketWriter
from teomq.errors import ProtocolError as ProtocolError

class CoreConnection(Endpoint):
    """One client connection as the core sees it (its read path, output buffer and credit)."""

    def __init__(self, disp: Dispatcher, *args: Any, **kwargs: Any) -> None: ...
    transport: asyncio.Transport | None
    @property
    def n_parked(self) -> int: ...
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
    @property
    def writer(self) -> SocketWriter | None: ...
    def set_writer(self, writer: SocketWriter | None) -> None:
        """Let flushes write to the socket through ``writer`` (None: always the transport)."""
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
    def on_command(self, kind: int, fid: int, flags: int, data: bytes) -> None:
        """Hook: a SEND the broker answers itself (kind: a RouteKind, CMD_UNKNOWN or CMD_UNKNOWN_API)."""
    @property
    def subscriptions(self) -> list[bytes]:
        """Names of the commands this connection is subscribed to."""
    @property
    def pending_output(self) -> int: ...
