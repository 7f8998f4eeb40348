"""Command table and command-string parser in pure Python: the oracle of :mod:`teomq._core.command_parser`.

Command string schema (bytes; names are compared as bytes, no encoding is assumed)::

    name[/var_0/var_1/.../var_{n-1}[/data]]

    name    bytes before the first b"/" (the whole string when there is none); b"" when it starts with "/"
    var_i   the i-th b"/"-separated part after the name, for the n params of the command's pattern;
            b"" when the string has fewer parts
    data    everything after the n-th var, slashes included; b"" when nothing is left

    i.e. parts = payload.split(b"/"); name = parts[0];
         vars = tuple(parts[1+i] if 1+i < len(parts) else b"" for i in range(n));
         data = b"/".join(parts[1+n:])

Pattern rule (Go: strings.Split on "/", stop at the first empty segment, strings.Trim(seg, "{}")):
    ""                      -> ()
    "{data}/{description}"  -> (b"data", b"description")
    "{a}//{b}" , "{a}/"     -> (b"a",)
    "{{x}}" -> (b"x",)   "{}" -> (b"",)   "a/b" -> (b"a", b"b")

Examples, pattern "{data}/{description}":
    b"version/some_data"  -> vars (b"some_data", b""), data b""
    b"version/a/b/c/d"    -> vars (b"a", b"b"),       data b"c/d"
no pattern:
    b"num_players/42" -> data b"42";  b"num_players" and b"num_players/" -> data b"";
    b"num_players/42/" -> data b"42/"
An unknown name raises UnknownCommand(name): "command '<name>' not found".

Public API and behaviour are those of the Cython module, error for error; tests/test_command_parser.py
holds the two against each other.
"""

from __future__ import annotations

import operator

from teomq.errors import UnknownCommand

__all__ = ["CommandTable", "parse_pattern", "name_length"]


def _as_bytes(obj: object) -> bytes:
    """The bytes of a bytes-like object (any C-contiguous buffer, whatever its format)."""
    if type(obj) is bytes:
        return obj
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    with view:
        if not view.c_contiguous:
            raise BufferError("the buffer is not C-contiguous")
        return view.tobytes()


def _shown(name: bytes) -> str:
    """The name as error messages show it: at most 256 bytes, decoded with replacement."""
    return name[:256].decode("utf-8", "replace") + ("..." if len(name) > 256 else "")


def parse_pattern(pattern: str) -> tuple[bytes, ...]:
    """Param names of a pattern, by the Go rule: split on "/", stop at the first empty
    segment, strip every leading and trailing "{" and "}". Names come back UTF-8 encoded."""
    if not isinstance(pattern, str):
        raise TypeError(f"a pattern must be str, not '{type(pattern).__name__}'")
    params = []
    for seg in pattern.split("/"):
        if not seg:
            break
        params.append(seg.strip("{}").encode("utf-8"))
    return tuple(params)


def name_length(payload: object) -> int:
    """Length of the command name at the start of ``payload`` (bytes before the first b"/")."""
    data = _as_bytes(payload)
    slash = data.find(b"/")
    return len(data) if slash < 0 else slash


class CommandTable:
    """Command names -> dense indices 0..count-1, each with the param names of its pattern."""

    __slots__ = ("_index", "_names", "_params")

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        self._names: list[bytes] = []
        self._params: list[tuple[bytes, ...]] = []

    @property
    def count(self) -> int:
        """Number of registered commands."""
        return len(self._names)

    def add(self, name: bytes | str, pattern: str = "") -> int:
        """Register command ``name`` (bytes, or str taken as UTF-8) with a parameter ``pattern``.

        Returns its index (0, 1, 2, ... in the order of registration). Raises TypeError for
        a name that is neither bytes nor str or a pattern that is not str; ValueError for an
        empty name, a name holding b"/", or a name already registered.
        """
        if isinstance(name, str):
            key = name.encode("utf-8")
        elif isinstance(name, bytes):
            key = bytes(name)
        else:
            raise TypeError(f"a command name must be bytes or str, not '{type(name).__name__}'")
        if not isinstance(pattern, str):
            raise TypeError(f"a pattern must be str, not '{type(pattern).__name__}'")
        if not key:
            raise ValueError("a command name cannot be empty")
        if b"/" in key:
            raise ValueError(f"a command name cannot contain '/': '{_shown(key)}'")
        if key in self._index:
            raise ValueError(f"command '{_shown(key)}' is already registered")
        params = parse_pattern(pattern)
        index = len(self._names)
        self._names.append(key)
        self._params.append(params)
        self._index[key] = index
        return index

    def find(self, name: object) -> int:
        """Index of the command ``name`` (bytes-like, or str taken as UTF-8), or -1."""
        if isinstance(name, str):
            name = name.encode("utf-8")
        return self._index.get(_as_bytes(name), -1)

    def __contains__(self, name: object) -> bool:
        return self.find(name) >= 0

    def __len__(self) -> int:
        return len(self._names)

    def parse(self, payload: object) -> tuple[int, bytes, tuple[bytes, ...], bytes]:
        """Parse a command string: ``(index, name, vars, data)``.

        ``payload`` is any bytes-like object; the result holds bytes only. Raises
        UnknownCommand when the name is not registered.
        """
        data = _as_bytes(payload)
        name, sep, rest = data.partition(b"/")
        index = self._index.get(name)
        if index is None:
            raise UnknownCommand(name)
        n = len(self._params[index])
        if not sep:
            return index, self._names[index], (b"",) * n, b""
        parts = rest.split(b"/", n)  # n vars, then the rest whole
        if len(parts) > n:
            return index, self._names[index], tuple(parts[:n]), parts[n]
        return index, self._names[index], tuple(parts) + (b"",) * (n - len(parts)), b""

    def name_of(self, index: int) -> bytes:
        """The name of command ``index``. IndexError outside 0..len-1."""
        i = operator.index(index)
        if not 0 <= i < len(self._names):
            raise IndexError(f"command index {i} out of range")
        return self._names[i]

    def params_of(self, index: int) -> tuple[bytes, ...]:
        """The param names (bytes) of command ``index``. IndexError outside 0..len-1."""
        i = operator.index(index)
        if not 0 <= i < len(self._names):
            raise IndexError(f"command index {i} out of range")
        return self._params[i]

    def all_names(self) -> list[bytes]:
        """Every name, in index order (a new list)."""
        return list(self._names)
