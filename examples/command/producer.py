"""The command example's producer: it sends ``version/some_data`` and prints every answer with its time.

    python -m examples.command.producer -broker=<address> [-delay=1000000] [-timeout=5]

``version`` is a fanout command: every subscribed consumer answers, so the producer
collects answers until its timeout, as the original's command-mode producer does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime

from examples._common import Pending, main, parser, say
from teomq import Producer


async def produce(args: argparse.Namespace) -> None:
    name = args.name or "command-producer"
    async with Producer(args.broker, name=name, timeout=args.timeout) as producer:
        n = 0
        pending = Pending(name)
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


if __name__ == "__main__":
    sys.exit(main(produce, parser("Command example producer: sends version/some_data.", producer=True)))
