"""The command example's broker: ``teomq broker`` with the one command ``version``.

    python -m examples.command.broker [teomq broker flags, e.g. -listen :7050 -stat]
"""

import sys

from teomq.cli import broker_main

#: version/{data}/{description}, answered by every subscribed consumer (fanout, as the original)
ARGS = ["-command", "version/{data}/{description}:fanout"]

if __name__ == "__main__":
    sys.exit(broker_main(ARGS + sys.argv[1:]))
