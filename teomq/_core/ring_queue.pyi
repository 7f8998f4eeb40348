"""Type stub of the compiled teomq._core.ring_queue (ring_queue.pyx): the broker's message ring.

The broker uses the ring from C; the Python methods are its view for tests and benchmarks.
"""

from typing import SupportsIndex, final

from _typeshed import ReadableBuffer

from teomq.errors import QueueFull as QueueFull

@final
class MsgRing:
    """FIFO of messages in a power-of-two ring that doubles up to ``max_items``."""

    def __init__(self, capacity: int = 1024, max_items: int = 1048576) -> None: ...
    @property
    def max_items(self) -> int: ...
    def push(self, payload: ReadableBuffer, msg_id: SupportsIndex = 0) -> None:
        """Append a message; raise QueueFull at the bound."""
    def push_head(self, payload: ReadableBuffer, msg_id: SupportsIndex = 0) -> None:
        """Put a message at the head (as redelivery does); never refused."""
    def pop(self) -> tuple[int, bytes]:
        """Remove the head message and return ``(msg_id, payload)``; IndexError when empty."""
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Slots allocated now (a power of two)."""
