"""What the example programs share: the original's flags, logging, running until Ctrl+C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from teomq.argtypes import flag, int_at_least
from teomq.loops import run

log = logging.getLogger("teomq.examples")


def parser(description: str, *, prog: str | None = None, producer: bool = False,
           api: bool = False) -> argparse.ArgumentParser:
    """The example programs' flags, in the Go original's single-dash form (``-broker=X``) or ``--broker X``."""
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    flag(p, "broker", required=True, metavar="BROKER",
         help="broker address (from the broker's first line), <address>@host:port, host:port or :port")
    flag(p, "name", default=None, help="this application's short name (default: the program's)")
    flag(p, "nomsg", action="store_true", help="don't print each message")
    flag(p, "stat", action="store_true", help="print counters every second")
    if producer:
        flag(p, "delay", type=int_at_least(0), default=1_000_000, metavar="MICROSECONDS",
             help="pause between messages in microseconds (default: %(default)s)")
        flag(p, "timeout", type=float, default=5.0, metavar="SECONDS",
             help="how long to collect the answers to each message (default: %(default)s)")
    if api:
        flag(p, "api", action="store_true",
             help="use the broker's API commands: subscribe with 130 msg, say hello with 129")
    return p


def run_example(build: Callable[[argparse.Namespace], Awaitable[None]], p: argparse.ArgumentParser,
                argv: Sequence[str] | None = None) -> int:
    """Parse flags and run ``build(args)`` on uvloop until it returns or Ctrl+C / SIGTERM."""
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    async def until_stopped() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(build(args))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        run(until_stopped(), "uvloop")
    except Exception as e:  # a refused subscription, an unreachable broker: one clear line
        print(f"{p.prog}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def say(line: str) -> None:
    """One line on stdout, flushed (the READMEs and tests read these)."""
    print(line, flush=True)


async def print_stat(sample: Callable[[], dict[str, int]]) -> None:
    while True:
        await asyncio.sleep(1.0)
        say("stat: " + " ".join(f"{k}={v}" for k, v in sample().items()))


async def run_consumer(consumer: Any, stat: bool) -> None:
    """Serve until the connection ends (or the program is stopped), with -stat lines if asked."""
    task = asyncio.ensure_future(print_stat(lambda: dict(consumer.stats))) if stat else None
    try:
        await consumer.wait_closed()
    finally:
        if task is not None:
            task.cancel()


class Pending:
    """A producer example's collect() calls in flight; an error is reported, never lost.

    Used as ``async with Producer(...) as producer, Pending(name) as pending:``: when the
    program stops, what is still being collected is cancelled, not reported as an error.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: set[asyncio.Future[list[bytes]]] = set()

    async def __aenter__(self) -> Pending:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self.tasks):
            task.cancel()

    def start(self, collect: Awaitable[list[bytes]]) -> None:
        task = asyncio.ensure_future(collect)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[list[bytes]]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            say(f"{self.name} error: {task.exception()}")
