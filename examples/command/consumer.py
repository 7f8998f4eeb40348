"""The command example's consumer: it handles ``version`` and answers ``version: <v>, data: <data>``.

    python -m examples.command.consumer -broker=<address>
"""

from __future__ import annotations

import argparse
import sys

from examples._common import main, parser, run_consumer, say
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
        await run_consumer(consumer, args.stat)


if __name__ == "__main__":
    sys.exit(main(consume, parser("Command example consumer: answers the version command.")))
