"""A consumer process for tests/test_delivery.py: the teomq library with a handler that
misbehaves on purpose. ``python delivery_consumer.py ENDPOINT MODE [ARG]`` prints ``ready``
once connected and one line per delivery (``got <data> attempt <n> at <monotonic>``) on
stdout, flushed, so the test sees what it got before it dies or is stopped.

Modes:
- ``poison``: answers ``ok <data>``; ``poison`` makes the process exit at once (``os._exit``)
- ``slow SECONDS``: an async handler that takes SECONDS, then answers (the client keeps the lease);
  a message that begins with ``quick`` it answers at once
- ``retry``: raises ``Retry(delay=1)`` at each message's first attempt, answers the second
- ``fail``: raises RuntimeError every time
- ``reject``: raises ``Reject("cannot use <data>")``
- ``answer``: answers ``ok <data>`` (a sync handler)

``-max-handler-time S`` and ``-prefetch N`` may follow.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from teomq import Consumer, Reject, Retry
from teomq.client import DeliveryContext


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    endpoint, mode, *rest = sys.argv[1:]
    arg = float(rest.pop(0)) if rest and not rest[0].startswith("-") else 0.0
    opts = dict(zip(rest[::2], rest[1::2]))
    max_handler_time = float(opts.get("-max-handler-time", 600))
    prefetch = int(opts.get("-prefetch", 8))

    def seen(data: bytes, ctx: DeliveryContext) -> None:
        say(f"got {data.decode()} attempt {ctx.attempt} at {time.monotonic():.3f}")

    def sync_handler(data: bytes, ctx: DeliveryContext) -> bytes:
        seen(data, ctx)
        if mode == "poison" and data == b"poison":
            os._exit(3)
        if mode == "retry" and ctx.attempt == 1:
            raise Retry(delay=1)
        if mode == "fail":
            raise RuntimeError(f"cannot do {data.decode()}")
        if mode == "reject":
            raise Reject(f"cannot use {data.decode()}")
        return b"ok " + data

    async def slow_handler(data: bytes, ctx: DeliveryContext) -> bytes:
        seen(data, ctx)
        if data.startswith(b"quick"):
            return b"ok " + data
        try:
            await asyncio.sleep(arg)
        except asyncio.CancelledError:
            say(f"cancelled {data.decode()}")
            raise
        say(f"done {data.decode()}")
        return b"ok " + data

    async def run() -> None:
        handler = slow_handler if mode == "slow" else sync_handler
        async with Consumer(endpoint, handler, name=f"{mode}-{os.getpid()}", prefetch=prefetch,
                            max_handler_time=max_handler_time) as c:
            say("ready")
            await c.wait_closed()

    asyncio.run(run())


if __name__ == "__main__":
    main()
