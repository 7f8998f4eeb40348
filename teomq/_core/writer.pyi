"""Type stub of the compiled teomq._core.writer (writer.pyx): the core's one socket writer."""

from typing import final

@final
class SocketWriter:
    """send()/sendmsg() of a connection's output to its socket (plain TCP/Unix transports only)."""

    def __init__(self, fd: int, backlog: bool = False) -> None: ...
    @property
    def fd(self) -> int: ...
    @property
    def transport_backlog(self) -> bool:
        """Whether the transport holds bytes of ours (written only through it until empty)."""
