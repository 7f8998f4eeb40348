"""``python -m teomq``: the ``teomq`` command line (see :mod:`teomq.cli`)."""

import sys

from teomq.cli import main

if __name__ == "__main__":
    sys.exit(main())
