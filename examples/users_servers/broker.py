"""The users_servers example's broker: ``teomq broker`` with the schema in schema.json.

    python -m examples.users_servers.broker [teomq broker flags, e.g. -listen :7050 -stat]

Commands: version ({data}/{description}), num_players ({num_players}), num_servers
({num_servers}); all fanout, as in the original: every subscribed consumer gets each one.
"""

import sys
from pathlib import Path

from teomq.cli import broker_main

SCHEMA = Path(__file__).with_name("schema.json")

if __name__ == "__main__":
    sys.exit(broker_main(["-schema", str(SCHEMA), *sys.argv[1:]]))
