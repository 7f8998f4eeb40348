"""The users_servers example's producer: it sends ``<command>/<1..100>`` every ``-delay`` microseconds.

    teomq example users_servers producer -broker=<address> -name=producer-1 -command=num_servers
    teomq example users_servers producer -broker=<address> -name=producer-2 -command=num_players

Each is a fanout command; the producer prints every consumer's answer as it comes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence

from teomq import Producer
from teomq.argtypes import flag
from teomq.examples._common import Pending, parser, run_example, say


async def produce(args: argparse.Namespace) -> None:
    name = args.name or "producer"
    async with Producer(args.broker, name=name, timeout=args.timeout) as producer, Pending(name) as pending:
        while True:
            message = f"{args.command}/{random.randint(1, 100)}"
            if not args.nomsg:
                say(f"{name} send {message}")

            def show(answer: bytes) -> None:
                if not args.nomsg:
                    say(f"{name} got answer: {answer.decode('utf-8', 'replace')}")

            pending.start(producer.collect(message, on_answer=show))
            await asyncio.sleep(args.delay / 1e6)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = parser("users_servers producer: sends num_players or num_servers values.", prog=prog, producer=True)
    flag(p, "command", choices=("num_players", "num_servers"), default="num_players",
         help="the command to send (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the producer with ``argv`` (default: the command line) until Ctrl+C."""
    return run_example(produce, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
