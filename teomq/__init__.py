"""teomq: a high-throughput message broker for Python services.

The hot path (framing, CRC32C, queue, dispatch) is Cython in :mod:`teomq._core`; the
control plane (sessions, subscriptions, commands, timers, CLI) is asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from teomq.errors import (  # noqa: E402
    AddressError,
    BrokerError,
    Cancelled,
    ConnectionLost,
    DeadLettered,
    Expired,
    NoConsumer,
    ProtocolError,
    QueueFull,
    QueueFullError,
    Reject,
    Rejected,
    RequestTimeout,
    Retry,
    TeomqError,
    UnknownCommand,
)

if TYPE_CHECKING:  # at run time __getattr__ below imports them on first use
    from teomq.broker import Broker
    from teomq.client import Client, Consumer, Producer
    from teomq.commands import Command, CommandCall, CommandSchema

__all__ = [
    "__version__",
    "Broker",
    "Producer",
    "Consumer",
    "Client",
    "Command",
    "CommandCall",
    "CommandSchema",
    "AddressError",
    "BrokerError",
    "Cancelled",
    "ConnectionLost",
    "DeadLettered",
    "DeliveryContext",
    "Expired",
    "NoConsumer",
    "ProtocolError",
    "QueueFull",
    "QueueFullError",
    "Reject",
    "Rejected",
    "RequestTimeout",
    "Retry",
    "TeomqError",
    "UnknownCommand",
]


def __getattr__(name: str) -> object:
    # Broker and clients import the compiled core; load them on first use.
    if name == "Broker":
        from teomq.broker import Broker

        return Broker
    if name in ("Producer", "Consumer", "Client", "DeliveryContext"):
        from teomq import client

        return getattr(client, name)
    if name in ("Command", "CommandCall", "CommandSchema"):
        from teomq import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'teomq' has no attribute {name!r}")
