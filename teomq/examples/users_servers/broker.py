"""The users_servers example's broker: ``teomq broker`` with the schema in schema.json.

    teomq example users_servers broker [teomq broker flags, e.g. -listen :7050 -stat]

Commands: version ({data}/{description}), num_players ({num_players}), num_servers
({num_servers}); all fanout, as in the original: every subscribed consumer gets each one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from teomq.cli import main as teomq_main

SCHEMA = Path(__file__).with_name("schema.json")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``teomq broker -schema schema.json`` and then ``argv`` (its help and errors name ``teomq broker``)."""
    return teomq_main(["broker", "-schema", str(SCHEMA), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
