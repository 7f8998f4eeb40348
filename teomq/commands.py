"""Command schemas: the names a broker accepts in command mode and a consumer handles.

A command string is ``name/rest`` (the Go original's command scheme)::

    num_players/42              -> command num_players, data "42"
    version/some_data           -> command version (pattern {data}/{description}),
                                   vars {data: some_data, description: ""}

A :class:`Command` has a name, a description, an optional parameter pattern such as
``{data}/{description}`` and, in a broker's schema, a routing:

- ``fanout`` (the original's behaviour): every subscribed consumer gets the message; the
  producer collects every answer until its timeout (:meth:`teomq.Client.collect`);
- ``queue``: one subscribed consumer gets it, in runs (see -dispatch-run), at least once (like the basic
  scheme); the producer gets one answer (:meth:`teomq.Client.request`).

The parser (split into name, vars and data) is :class:`teomq._core.command_parser.CommandTable`,
in C: the broker looks up every message's name there without creating a Python object.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from teomq._core.command_parser import CommandTable, parse_pattern

__all__ = ["BROKER_COMMANDS", "Command", "CommandCall", "CommandSchema", "CommandVars", "ROUTINGS",
           "parse_command_spec"]

ROUTINGS = ("fanout", "queue")
#: Names the broker answers itself; a schema cannot use them.
BROKER_COMMANDS = ("subscribe", "unsubscribe", "hello", "msg")
#: delivery guarantees (docs/semantics.md): the broker's defaults (-lease, -max-deliveries,
#: -max-crashes, -retry-base, -retry-max, -dlq-max); a command's own lease and limits override them
DEFAULT_LEASE = 30.0
DEFAULT_MAX_DELIVERIES = 20
DEFAULT_MAX_CRASHES = 3
DEFAULT_RETRY_BASE = 1.0
DEFAULT_RETRY_MAX = 60.0
DEFAULT_DLQ_MAX = 10_000
#: most dead letters one ``teomq dlq list`` answer carries
DLQ_LIST_MAX = 1000
#: what a schema file's command may say
_SCHEMA_KEYS = frozenset({"name", "description", "pattern", "routing", "max_messages", "max_bytes", "lease",
                          "max_deliveries", "max_crashes", "priority", "ttl", "dead_letter_expired"})
_SPEC = re.compile(r"^(?P<name>[^/:]+)(?:/(?P<pattern>[^:]*))?(?::(?P<routing>[a-z]+))?$")


@dataclass(frozen=True)
class Command:
    """One command of a schema."""

    name: str
    description: str = ""
    pattern: str = ""
    routing: str = "fanout"
    #: a broker's limits on the messages waiting in this command's queue (0: none): past them a
    #: SEND is refused with QUEUE_FULL (retryable); messages in flight do not count
    max_messages: int = 0
    max_bytes: int = 0
    #: delivery guarantees of its messages (docs/semantics.md), 0 for the broker's (-lease,
    #: -max-deliveries, -max-crashes): seconds a delivery may stay unanswered; failed deliveries
    #: before the dead-letter queue; of them, endings on the consumer's side
    lease: float = 0.0
    max_deliveries: int = 0
    max_crashes: int = 0
    #: its messages that name no priority get this one (0, the lowest, to 7); those that name no
    #: deadline or ttl are removed when not delivered within ``ttl`` seconds (0: never), to the
    #: dead-letter queue if ``dead_letter_expired``
    priority: int = 0
    ttl: float = 0.0
    dead_letter_expired: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a command needs a non-empty name")
        if "/" in self.name:
            raise ValueError(f"command name {self.name!r} cannot contain '/'")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing of command {self.name!r} must be one of {', '.join(ROUTINGS)}, "
                             f"not {self.routing!r}")
        for what in ("max_messages", "max_bytes", "max_deliveries", "max_crashes"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{what} of command {self.name!r} must be a whole number, 0 for none, not {value!r}")
        for what in ("max_deliveries", "max_crashes"):
            if getattr(self, what) > 10000:
                raise ValueError(f"{what} of command {self.name!r} must be at most 10000")
        if not isinstance(self.lease, (int, float)) or isinstance(self.lease, bool) or not 0 <= self.lease <= 86400:
            raise ValueError(f"lease of command {self.name!r} must be 0 (the broker's) to 86400 seconds, "
                             f"not {self.lease!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or not 0 <= self.priority <= 7:
            raise ValueError(f"priority of command {self.name!r} must be a whole number from 0 to 7, "
                             f"not {self.priority!r}")
        if not isinstance(self.ttl, (int, float)) or isinstance(self.ttl, bool) or not 0 <= self.ttl <= 4000000:
            raise ValueError(f"ttl of command {self.name!r} must be 0 (none) to 4000000 seconds, not {self.ttl!r}")
        if not isinstance(self.dead_letter_expired, bool):
            raise ValueError(f"dead_letter_expired of command {self.name!r} must be true or false, "
                             f"not {self.dead_letter_expired!r}")

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter positions of the pattern, by the Go rule (:func:`~teomq._core.command_parser.parse_pattern`):
        one name per '/'-separated part, trimmed of white space, '{}', white space; "" for a
        position without a var."""
        return tuple(p.decode("utf-8") for p in parse_pattern(self.pattern))

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description, "pattern": self.pattern,
                "routing": self.routing}


class CommandVars(dict[str, str]):
    """A call's vars: the keys the command string set, and "" for a parameter of the command it did not.

    Like the original's Go map: a string with an empty rest sets no vars at all (``len`` 0, no
    keys), yet ``vars["data"]`` reads "" for a command whose pattern names ``data``. A name
    the pattern does not have raises KeyError; ``in``, ``get`` and iteration see only the keys set.
    """

    __slots__ = ("names",)

    def __init__(self, names: frozenset[str], items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self.names = names  #: the command's parameter names

    def __missing__(self, key: str) -> str:
        if key in self.names:
            return ""
        raise KeyError(key)


@dataclass(frozen=True)
class CommandCall:
    """A received command string, parsed with the consumer's schema."""

    name: str
    vars: Mapping[str, str]  #: a :class:`CommandVars`
    data: bytes
    raw: bytes = field(repr=False)

    @property
    def text(self) -> str:
        """``data`` as text (UTF-8, undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")


def parse_command_spec(spec: str) -> Command:
    """A command from its command-line form ``NAME[/PATTERN][:ROUTING]``.

    Examples: ``num_players``, ``num_players:queue``, ``version/{data}/{description}``,
    ``version/{data}/{description}:fanout``.
    """
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(f"bad command {spec!r}: expected NAME[/PATTERN][:ROUTING], "
                         "e.g. num_players:queue or version/{data}/{description}")
    return Command(m["name"], pattern=m["pattern"] or "", routing=m["routing"] or "fanout")


class CommandSchema:
    """An ordered set of commands with the C parser behind it.

    Args:
        commands: :class:`Command` objects, or dicts with the same keys.
        reserve_broker_names: refuse the names the broker answers itself (a broker's
            schema must; a consumer's may skip it).
    """

    def __init__(self, commands: Iterable[Command | Mapping[str, Any]] = (), *,
                 reserve_broker_names: bool = True) -> None:
        self._reserve = reserve_broker_names
        self._commands: list[Command] = []
        self._var_names: list[frozenset[str]] = []  # index -> the names its pattern gives vars
        self._table = CommandTable()
        for c in commands:
            self.add(c if isinstance(c, Command) else Command(**dict(c)))

    def add(self, command: Command | str, description: str = "", pattern: str = "",
            routing: str = "fanout") -> Command:
        """Register a command (a :class:`Command`, or its fields); returns it."""
        if isinstance(command, str):
            command = Command(command, description, pattern, routing)
        if self._reserve and command.name in BROKER_COMMANDS:
            raise ValueError(f"{command.name!r} is a broker command; choose another name")
        self._table.add(command.name, command.pattern)  # ValueError for a duplicate
        self._commands.append(command)
        self._var_names.append(frozenset(p for p in command.params if p))
        return command

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CommandSchema:
        """Read a schema file: JSON ``{"commands": [{"name", "description", "pattern", "routing",
        "max_messages", "max_bytes", "lease", "max_deliveries", "max_crashes", "priority", "ttl",
        "dead_letter_expired"}, ...]}`` (all but the name optional)."""
        with open(path, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON: {e}") from None
        items = doc.get("commands") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise ValueError(f'{path}: expected {{"commands": [...]}}')
        schema = cls()
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not set(item) <= _SCHEMA_KEYS:
                raise ValueError(f"{path}: command #{i + 1} must be an object with keys "
                                 f"{', '.join(sorted(_SCHEMA_KEYS))}")
            try:
                schema.add(Command(**item))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: command #{i + 1}: {e}") from None
        return schema

    @property
    def table(self) -> CommandTable:
        """The C command table (index i is the i-th command added)."""
        return self._table

    def parse(self, payload: bytes | bytearray | memoryview) -> CommandCall:
        """Split a command string; raises :class:`teomq.errors.UnknownCommand`."""
        return self.parse_indexed(payload)[1]

    def parse_indexed(self, payload: bytes | bytearray | memoryview) -> tuple[int, CommandCall]:
        """:meth:`parse`, with the command's index (its place in the order of :meth:`add`)."""
        idx, name, values, data = self._table.parse(payload)
        params = self._table.params_of(idx)  # values is () (no vars) or one per position; b"" names no var
        vars_ = {p.decode("utf-8", "replace"): v.decode("utf-8", "replace") for p, v in zip(params, values) if p}
        return idx, CommandCall(
            name.decode("utf-8", "replace"),
            CommandVars(self._var_names[idx], vars_),
            data,
            bytes(payload),
        )

    def get(self, name: str) -> Command | None:
        idx = self._table.find(name)
        return self._commands[idx] if idx >= 0 else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, bytes)) and self._table.find(name) >= 0

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands)

    def __len__(self) -> int:
        return len(self._commands)

    def __repr__(self) -> str:
        return f"CommandSchema({[c.name for c in self._commands]!r})"
