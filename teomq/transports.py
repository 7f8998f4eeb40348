"""Which transports the core may write to directly.

The core's write path (``WriteBuffer.write_to``) writes to a connection's socket itself while
the transport holds nothing of ours, and hands the transport the rest. That is only right
when the transport is the socket: under TLS, or any transport that wraps another (a proxy,
a test's recorder, the web gateway's virtual transports), bytes written to the fd would
bypass it. So the fd is handed to the core only for the plain stream transports of asyncio
and uvloop, named here; every other transport gets every byte through ``write()``.
"""

from __future__ import annotations

import asyncio
import socket

__all__ = ["direct_socket"]

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
