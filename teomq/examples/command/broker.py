"""The command example's broker: ``teomq broker`` with the one command ``version``.

    teomq example command broker [teomq broker flags, e.g. -listen :7050 -stat]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from teomq.cli import main as teomq_main

#: version/{data}/{description}, answered by every subscribed consumer (fanout, as the original)
ARGS = ["-command", "version/{data}/{description}:fanout"]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``teomq broker`` with ARGS and then ``argv`` (its help and errors name ``teomq broker``)."""
    return teomq_main(["broker", *ARGS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
