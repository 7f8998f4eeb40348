"""The original's consumer_api program, by its name: the users_servers consumer (consumer.py).

    teomq example users_servers consumer_api -broker=<address> -api
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from teomq.examples._common import parser, run_example
from teomq.examples.users_servers.consumer import consume


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the consumer with ``argv`` (default: the command line) until Ctrl+C."""
    return run_example(consume, parser("users_servers consumer using the broker's API commands.", prog=prog,
                                       api=True), argv)


if __name__ == "__main__":
    sys.exit(main())
