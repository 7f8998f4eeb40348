"""Type stub of the compiled teomq._core.command_parser (command_parser.pyx).

The command table and the command-string parser; ``teomq._py.command_parser`` is the
pure-Python twin. Names and payloads are bytes-like (a str name is taken as UTF-8).
"""

from typing import Final, SupportsIndex, final

from _typeshed import ReadableBuffer

from teomq.errors import UnknownCommand as UnknownCommand

__all__ = ["CommandTable", "parse_pattern", "name_length"]

#: Go's unicode.IsSpace set: what patterns are trimmed of
WHITE_SPACE: Final[str]

def parse_pattern(pattern: str) -> tuple[bytes, ...]:
    """Parameter positions of a pattern, by the Go rule; names come back UTF-8 encoded."""

def name_length(payload: ReadableBuffer) -> int:
    """Length of the command name at the start of ``payload`` (bytes before the first b"/")."""

@final
class CommandTable:
    """Command names -> dense indices 0..count-1, each with its parameter positions."""

    def __init__(self) -> None: ...
    @property
    def count(self) -> int: ...
    def add(self, name: bytes | str, pattern: str = "") -> int:
        """Register command ``name`` with a parameter ``pattern``; returns its index."""
    def find(self, name: str | ReadableBuffer) -> int:
        """Index of the command ``name``, or -1."""
    def __contains__(self, name: str | ReadableBuffer) -> bool: ...
    def __len__(self) -> int: ...
    def parse(self, payload: ReadableBuffer) -> tuple[int, bytes, tuple[bytes, ...], bytes]:
        """Parse a command string: ``(index, name, vars, data)``; UnknownCommand for an unknown name."""
    def name_of(self, index: SupportsIndex) -> bytes:
        """The name of command ``index``. IndexError outside 0..len-1."""
    def params_of(self, index: SupportsIndex) -> tuple[bytes, ...]:
        """The parameter positions of command ``index``. IndexError outside 0..len-1."""
    def all_names(self) -> list[bytes]:
        """Every name, in index order (a new list)."""
