"""The users_servers example's consumer: it logs num_players and num_servers and answers version.

    teomq example users_servers consumer -broker=<address>
    teomq example users_servers consumer -broker=<address> -api    # as consumer_api -api

Without ``-api`` it subscribes with the client's subscribe() (``subscribe/<cmd>``); with
``-api`` it goes through the broker's API commands as the original's consumer_api does:
130 ``msg`` with ``subscribe/<cmd>`` for each command, and 129 ``hello`` with its name.
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
    name = args.name or ("usrser-consumer-api" if args.api else "usrser-consumer")
    consumer = Consumer(args.broker, name=name)
    subscribe = not args.api  # with -api the subscriptions go through API command 130

    @consumer.command("version", "Get consumer version.", pattern="{data}/{description}", subscribe=subscribe)
    def version(cmd: CommandCall) -> str:
        return f"version: {APP_VERSION}, data: {cmd.vars['data']}"

    def log_value(cmd: CommandCall) -> str:
        value = cmd.vars[cmd.name]
        if not args.nomsg:
            say(f"{name} got command {cmd.name}: {value}")
        return f"{name} got {cmd.name}: {value}"

    consumer.command("num_players", "Number of players.", pattern="{num_players}", subscribe=subscribe)(log_value)
    consumer.command("num_servers", "Number of servers.", pattern="{num_servers}", subscribe=subscribe)(log_value)

    async with consumer:
        if consumer.scheme != "command":
            raise RuntimeError(f"broker {consumer.address} runs the basic scheme: start the users_servers broker")
        if args.api:
            for command in ("version", "num_players", "num_servers"):
                await consumer.call_api("msg", f"subscribe/{command}")
            say(f"{name} hello answer: {(await consumer.hello(name)).decode('utf-8', 'replace')}")
        say(f"{name} subscribed to version, num_players, num_servers at broker {consumer.address}")
        await run_consumer(consumer, args.stat)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the consumer with ``argv`` (default: the command line) until Ctrl+C."""
    return run_example(consume, parser("users_servers consumer: logs num_players and num_servers.", prog=prog,
                                       api=True), argv)


if __name__ == "__main__":
    sys.exit(main())
