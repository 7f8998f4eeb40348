"""The command example's producer: it sends ``version/some_data`` and prints every answer with its time.

    teomq example command producer -broker=<address> [-delay=1000000] [-timeout=5]

``version`` is a fanout command: every subscribed consumer answers, so the producer
collects answers until its timeout, as the original's command-mode producer does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from teomq import Producer
from teomq.examples._common import Pending, parser, run_example, say


async def produce(args: argparse.Namespace) -> None:
    name = args.name or "command-producer"
    async with Producer(args.broker, name=name, timeout=args.timeout) as producer, Pending(name) as pending:
        n = 0
        while True:
            n += 1
            sent = time.perf_counter()

            def show(answer: bytes, n: int = n, sent: float = sent) -> None:
                if not args.nomsg:
                    ms = (time.perf_counter() - sent) * 1000
                    say(f"{datetime.now():%H:%M:%S.%f} {name} #{n} answer in {ms:.3f} ms: "
                        f"{answer.decode('utf-8', 'replace')}")

            pending.start(producer.collect("version/some_data", on_answer=show))
            await asyncio.sleep(args.delay / 1e6)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the producer with ``argv`` (default: the command line) until Ctrl+C."""
    return run_example(produce, parser("Command example producer: sends version/some_data.", prog=prog, producer=True),
                       argv)


if __name__ == "__main__":
    sys.exit(main())
