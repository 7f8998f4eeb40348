"""The command example's consumer: it handles ``version`` and answers ``version: <v>, data: <data>``.

    teomq example command consumer -broker=<address>
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from teomq import Consumer
from teomq.commands import CommandCall
from teomq.examples._common import parser, run_consumer, run_example, say

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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the consumer with ``argv`` (default: the command line) until Ctrl+C."""
    return run_example(consume, parser("Command example consumer: answers the version command.", prog=prog), argv)


if __name__ == "__main__":
    sys.exit(main())
