"""Which transports the core may write to directly, and the writer that does.

The core is sans-IO: it encodes frames into a WriteBuffer. The protocol layer owns the one
writer (``teomq._core.writer.SocketWriter``) that send()s them to a connection's socket while
the transport holds nothing of ours, handing the transport the rest. That is only right when
the transport is the socket: under TLS, or any transport that wraps another (a proxy, a
test's recorder), bytes written to the fd would bypass it. So a writer is made only for the plain stream transports of asyncio and uvloop, named
here; every other transport gets every byte through ``write()``.
"""

from __future__ import annotations

import asyncio
import socket

from teomq._core.writer import SocketWriter

__all__ = ["direct_socket", "socket_writer"]

#: (module, class name) of the transports that are a plain TCP or Unix socket.
_PLAIN = frozenset({
    ("asyncio.selector_events", "_SelectorSocketTransport"),
    ("uvloop.loop", "TCPTransport"),
    ("uvloop.loop", "UnixTransport"),
})


def direct_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """The socket of ``transport`` if the core may write to it directly, else None."""
    cls = type(transport)
    if (cls.__module__, cls.__name__) not in _PLAIN or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock if sock is not None and sock.fileno() >= 0 else None


def socket_writer(transport: asyncio.BaseTransport, *, backlog: bool = False) -> SocketWriter | None:
    """The writer for ``transport``'s socket, or None when the core must not go around it.

    ``backlog``: bytes went through the transport already (ask it once before writing direct).
    """
    sock = direct_socket(transport)
    return None if sock is None else SocketWriter(sock.fileno(), backlog)
