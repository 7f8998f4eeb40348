"""Type stub of the compiled teomq._core.store (store.pyx): the store seam under the queues."""

class Store:
    """Where accepted messages are kept (today: in memory); append numbers each one."""

    @property
    def last_seq(self) -> int:
        """Sequence number of the latest message appended."""
