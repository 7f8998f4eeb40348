"""The command example's consumer: it handles ``version`` and answers ``version: <v>, data: <data>``.

    python -m examples.command.consumer -broker=<address>
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from examples._common import main, parser, print_stat, say
from teomq import Consumer
from teomq.commands import CommandCall

APP_VERSION = "0.0.1"


async def consume(args: argparse.Namespace) -> None:
    name = args.name or "command-consumer"
    consumer = Consumer(args.broker, name=name)

    @consumer.command("version", "Get consumer version.", pattern="{data}/{description}")
    def version(cmd: CommandCall) -> str:
        if not args.nomsg:
            say(f"{name} got command {cmd.name}: data={cmd.vars['data']!r} description={cmd.vars['description']!r}")
        return f"version: {APP_VERSION}, data: {cmd.vars['data']}"

    async with consumer:
        say(f"{name} subscribed to {', '.join(consumer.subscriptions)} at broker {consumer.address}")
        stat = asyncio.ensure_future(print_stat(lambda: dict(consumer.stats))) if args.stat else None
        try:
            await consumer.wait_closed()
        finally:
            if stat is not None:
                stat.cancel()


if __name__ == "__main__":
    sys.exit(main(consume, parser("Command example consumer: answers the version command.")))
