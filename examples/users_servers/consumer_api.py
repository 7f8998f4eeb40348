"""The original's consumer_api program, by its name: the users_servers consumer (consumer.py).

    python -m examples.users_servers.consumer_api -broker=<address> -api
"""

import sys

from examples._common import main, parser
from examples.users_servers.consumer import consume

if __name__ == "__main__":
    sys.exit(main(consume, parser("users_servers consumer using the broker's API commands.", api=True)))
