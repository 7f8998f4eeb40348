"""Command table and command-string parser in pure Python: the oracle of :mod:`teomq._core.command_parser`.

The rules are the Go original's (kirill-scherba/command v2.3.6, ``ParseCommand`` and ``ParamsSlice``;
UPSTREAM.md "Command scheme"). Bytes throughout; names are compared as bytes, no encoding is assumed.

Pattern -> parameter positions (``parse_pattern``, at registration; rule 4)::

    4. ""  -> no positions;
       otherwise split at every "/"; each part is trimmed of white space, then of every "{" and "}"
       at both ends, then of white space again. A part that ends up empty still holds its
       position (it counts) but names no var: its name is b"".

    "{data}/{description}" -> (b"data", b"description")   " { x } /{y}" -> (b"x", b"y")
    "{a}//{b}" -> (b"a", b"", b"b")   "{a}/" -> (b"a", b"")   "{}/{z}" -> (b"", b"z")   "{{x}}" -> (b"x",)

    White space is Go's unicode.IsSpace set (WHITE_SPACE below): Python's str.isspace() also
    counts U+001C..U+001F, which Go does not trim.

Command string -> ``(index, name, vars, data)`` (``CommandTable.parse``; rules 1-3 and 5-7),
for a command with k positions::

    1. name = bytes before the first b"/"; rest = bytes after it (b"" when there is no b"/")
    2. a name not in the table raises UnknownCommand(name): "command '<name>' not found"
       (an empty name too: "command '' not found")
    3. rest == b""  -> vars (), data b""          (no vars at all, whatever k is)
    5. otherwise parts = rest.split(b"/", k)     (at most k + 1 parts)
    6. vars[i] = parts[i], or b"" when there are fewer parts; b"" too for a position without a name
    7. data = parts[k] when len(parts) > k, else b""

    So ``vars`` is () or has exactly k entries, aligned with ``params_of(index)``: a consumer
    builds its vars as {params[i]: vars[i] for each i whose params[i] is not b""}.

Examples::

    "{data}/{description}"  b"version/some_data" -> vars (b"some_data", b""), data b""
                            b"version/a/b/c/d"   -> vars (b"a", b"b"),        data b"c/d"
                            b"version", b"version/" -> vars (), data b""
    "{a}//{b}"              rest b"1/2/3/4"      -> vars (b"1", b"", b"3"),   data b"4"   i.e. {a: 1, b: 3}
    "{a}/"                  rest b"1/2/3"        -> vars (b"1", b""),         data b"3"   i.e. {a: 1}
    no pattern              b"num_players/42"    -> vars (), data b"42";  b"num_players/42/" -> data b"42/"

Public API and behaviour are those of the Cython module, error for error; tests/test_command_parser.py
holds the two against each other and against a reference written from the rules.
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


#: Go's unicode.IsSpace: what strings.TrimSpace trims (str.strip() would also take U+001C..U+001F).
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"


def parse_pattern(pattern: str) -> tuple[bytes, ...]:
    """Parameter positions of a pattern, by the Go rule: none for "", else one per "/"-separated
    part, trimmed of white space, then of "{" and "}", then of white space again; b"" for a part
    that ends up empty (a position without a var). Names come back UTF-8 encoded."""
    if not isinstance(pattern, str):
        raise TypeError(f"a pattern must be str, not '{type(pattern).__name__}'")
    if not pattern:
        return ()
    return tuple(part.strip(WHITE_SPACE).strip("{}").strip(WHITE_SPACE).encode("utf-8")
                 for part in pattern.split("/"))


def name_length(payload: object) -> int:
    """Length of the command name at the start of ``payload`` (bytes before the first b"/")."""
    data = _as_bytes(payload)
    slash = data.find(b"/")
    return len(data) if slash < 0 else slash


class CommandTable:
    """Command names -> dense indices 0..count-1, each with the param names of its pattern."""

    __slots__ = ("_index", "_names", "_params", "_blank")

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        self._names: list[bytes] = []
        self._params: list[tuple[bytes, ...]] = []
        self._blank: list[bool] = []  # index -> some position of its pattern has no name

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
        self._blank.append(b"" in params)
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
        """Parse a command string: ``(index, name, vars, data)`` (the rules at the top).

        ``vars`` is () when the rest is empty, else one entry per position of the pattern
        (b"" for a position without a name). ``payload`` is any bytes-like object; the result
        holds bytes only. Raises UnknownCommand when the name is not registered.
        """
        data = _as_bytes(payload)
        name, _, rest = data.partition(b"/")
        index = self._index.get(name)
        if index is None:
            raise UnknownCommand(name)
        if not rest:  # no vars at all
            return index, self._names[index], (), b""
        params = self._params[index]
        n = len(params)
        parts = rest.split(b"/", n)  # at most n + 1 parts
        if len(parts) > n:
            values, tail = parts[:n], parts[n]
        else:
            values, tail = parts + [b""] * (n - len(parts)), b""
        if self._blank[index]:
            values = [v if p else b"" for p, v in zip(params, values)]
        return index, self._names[index], tuple(values), tail

    def name_of(self, index: int) -> bytes:
        """The name of command ``index``. IndexError outside 0..len-1."""
        i = operator.index(index)
        if not 0 <= i < len(self._names):
            raise IndexError(f"command index {i} out of range")
        return self._names[i]

    def params_of(self, index: int) -> tuple[bytes, ...]:
        """The parameter positions of command ``index``: names as bytes, b"" for a position
        without a var. IndexError outside 0..len-1."""
        i = operator.index(index)
        if not 0 <= i < len(self._names):
            raise IndexError(f"command index {i} out of range")
        return self._params[i]

    def all_names(self) -> list[bytes]:
        """Every name, in index order (a new list)."""
        return list(self._names)
