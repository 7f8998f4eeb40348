"""``teomq example NAME ROLE [flags]``: run one of the Go original's example programs.

The programs live in :mod:`teomq.examples` (installed with teomq), so the command works from any
directory, the repository root included. The flags after ROLE are that program's own
(``teomq example users_servers consumer --help``); this module only picks the program.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from teomq.examples import EXAMPLES

PROG = "teomq example"
HELP = ("-h", "--help")


def listing(only: str | None = None) -> str:
    """The usage text: every example (or only one) with its roles and what each does."""
    names = [only] if only else list(EXAMPLES)
    lines = [f"usage: {PROG} {only or 'NAME'} ROLE [flags]   ({PROG} NAME ROLE --help: the flags of ROLE)", ""]
    lines.append("Run one of the Go original's example programs (start its broker first)." if not only else
                 f"{only}: {EXAMPLES[only][0]}.")
    for name in names:
        about, roles = EXAMPLES[name]
        lines += [""] if only else ["", f"{name}: {about}"]
        width = max(map(len, roles))
        lines += [f"  {PROG} {name} {role:<{width}}  {what}" for role, what in roles.items()]
    return "\n".join(lines)


def _usage_error(message: str, only: str | None = None) -> int:
    print(f"{listing(only)}\n\n{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``teomq example`` (``argv`` is what follows ``example``)."""
    args = list(sys.argv[2:] if argv is None else argv)
    if not args:
        return _usage_error("give an example NAME and a ROLE")
    if args[0] in HELP:
        print(listing(), flush=True)
        return 0
    name = args[0]
    if name not in EXAMPLES:
        return _usage_error(f"unknown example {name!r} (choose from {', '.join(EXAMPLES)})")
    roles = EXAMPLES[name][1]
    if len(args) < 2:
        return _usage_error(f"give a ROLE of {name}", name)
    if args[1] in HELP:
        print(listing(name), flush=True)
        return 0
    role = args[1]
    if role not in roles:
        return _usage_error(f"unknown role {role!r} of {name} (choose from {', '.join(roles)})", name)
    program = importlib.import_module(f"teomq.examples.{name}.{role}")
    return program.main(args[2:], prog=f"{PROG} {name} {role}")
