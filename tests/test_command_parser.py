"""Command parser: the Cython core and its pure-Python twin, against the spec and against each other.

The spec is the Go original's command scheme (UPSTREAM.md "Command scheme"); ``ref_parse`` and
``ref_pattern`` below restate it as plainly as possible and are the third opinion in the
property tests. Payloads are also parsed prefix by prefix, so every cut (empty rest, trailing
slash, missing vars) is hit.
"""

from __future__ import annotations

import array
import importlib.machinery
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teomq._core import command_parser as core
from teomq._py import command_parser as twin
from teomq.errors import UnknownCommand

IMPLS = [core, twin]
each_impl = pytest.mark.parametrize("impl", IMPLS, ids=["core", "twin"])

VERSION_PATTERN = "{data}/{description}"


# -- the spec, restated -------------------------------------------------------------------------


def ref_pattern(pattern: str) -> tuple[bytes, ...]:
    """Go: for _, seg := range strings.Split(p, "/") { if seg == "" { break }; strings.Trim(seg, "{}") }."""
    out = []
    for seg in pattern.split("/"):
        if seg == "":
            break
        lo, hi = 0, len(seg)
        while lo < hi and seg[lo] in "{}":
            lo += 1
        while hi > lo and seg[hi - 1] in "{}":
            hi -= 1
        out.append(seg[lo:hi].encode("utf-8"))
    return tuple(out)


def ref_parse(table: dict[bytes, tuple[int, tuple[bytes, ...]]], payload: bytes):
    parts = payload.split(b"/")
    name = parts[0]
    if name not in table:
        raise UnknownCommand(name)
    index, params = table[name]
    n = len(params)
    vars_ = tuple(parts[1 + i] if 1 + i < len(parts) else b"" for i in range(n))
    return index, name, vars_, b"/".join(parts[1 + n:])


def outcome(fn, *args):
    """A call's result, or its exception as (type, args, .name) so two can be compared."""
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever comes out
        return ("raise", type(e), e.args, getattr(e, "name", None))


def example_table(impl: ModuleType):
    t = impl.CommandTable()
    assert t.add("version", VERSION_PATTERN) == 0
    assert t.add(b"num_players") == 1
    assert t.add("num_servers", "") == 2
    assert t.add("hello", "{name}") == 3
    return t


def test_core_is_compiled() -> None:
    assert core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), core.__file__


@each_impl
def test_module_api(impl: ModuleType) -> None:
    assert set(impl.__all__) == {"CommandTable", "parse_pattern", "name_length"}
    assert impl.name_length.__name__ == "name_length"


# -- pattern rule -------------------------------------------------------------------------------

PATTERNS = [
    ("", ()),
    ("{data}", (b"data",)),
    ("{data}/{description}", (b"data", b"description")),
    ("{a}//{b}", (b"a",)),
    ("{a}/", (b"a",)),
    ("/{a}", ()),
    ("{{x}}", (b"x",)),
    ("{}", (b"",)),
    ("{}/{b}", (b"", b"b")),
    ("a/b", (b"a", b"b")),
    ("{a}b}", (b"a}b",)),
    ("x{y}z", (b"x{y}z",)),
    ("{é}", ("é".encode(),)),
    ("}{", (b"",)),
]


@each_impl
@pytest.mark.parametrize("pattern,params", PATTERNS)
def test_parse_pattern(impl: ModuleType, pattern: str, params: tuple) -> None:
    assert impl.parse_pattern(pattern) == params == ref_pattern(pattern)
    t = impl.CommandTable()
    t.add("cmd", pattern)
    assert t.params_of(0) == params


@each_impl
def test_parse_pattern_errors(impl: ModuleType) -> None:
    for bad in (None, b"{a}", 1):
        with pytest.raises(TypeError, match="a pattern must be str"):
            impl.parse_pattern(bad)
    with pytest.raises(UnicodeEncodeError):
        impl.parse_pattern("{\ud800}")


# -- parsing: the examples ----------------------------------------------------------------------

EXAMPLES = [
    (b"version/some_data", (0, b"version", (b"some_data", b""), b"")),
    (b"version/a/b/c/d", (0, b"version", (b"a", b"b"), b"c/d")),
    (b"version", (0, b"version", (b"", b""), b"")),
    (b"version/", (0, b"version", (b"", b""), b"")),
    (b"version//", (0, b"version", (b"", b""), b"")),
    (b"version///", (0, b"version", (b"", b""), b"")),
    (b"version////", (0, b"version", (b"", b""), b"/")),
    (b"version/a//c", (0, b"version", (b"a", b""), b"c")),
    (b"version/a/b/", (0, b"version", (b"a", b"b"), b"")),
    (b"version/a/b//", (0, b"version", (b"a", b"b"), b"/")),
    (b"num_players/42", (1, b"num_players", (), b"42")),
    (b"num_players", (1, b"num_players", (), b"")),
    (b"num_players/", (1, b"num_players", (), b"")),
    (b"num_players/42/", (1, b"num_players", (), b"42/")),
    (b"num_players//", (1, b"num_players", (), b"/")),
    (b"num_players/\xff\x00/\xfe", (1, b"num_players", (), b"\xff\x00/\xfe")),
    (b"num_servers/7", (2, b"num_servers", (), b"7")),
    (b"hello/World", (3, b"hello", (b"World",), b"")),
    (b"hello/World/and/more", (3, b"hello", (b"World",), b"and/more")),
    (b"hello/", (3, b"hello", (b"",), b"")),
]
UNKNOWN = [b"", b"/", b"//", b"/x", b"cmd//", b"foo", b"Version/x", b"version\x00/x", b"num", b"num_players_",
           b"\xff\xfe/x", b"hello\xff"]


@each_impl
@pytest.mark.parametrize("payload,expected", EXAMPLES, ids=[repr(p) for p, _ in EXAMPLES])
def test_parse_examples(impl: ModuleType, payload: bytes, expected: tuple) -> None:
    t = example_table(impl)
    got = t.parse(payload)
    assert got == expected
    assert all(type(x) is bytes for x in (got[1], *got[2], got[3]))
    table = {t.name_of(i): (i, t.params_of(i)) for i in range(len(t))}
    assert ref_parse(table, payload) == expected
    for kind in (bytearray, memoryview, lambda b: memoryview(bytearray(b))):
        assert t.parse(kind(payload)) == expected


@each_impl
@pytest.mark.parametrize("payload", UNKNOWN, ids=repr)
def test_parse_unknown(impl: ModuleType, payload: bytes) -> None:
    t = example_table(impl)
    name = payload.split(b"/")[0]
    with pytest.raises(UnknownCommand) as info:
        t.parse(payload)
    assert info.value.name == name and type(info.value.name) is bytes
    with pytest.raises(UnknownCommand):
        t.parse(bytearray(payload))


@each_impl
def test_unknown_message(impl: ModuleType) -> None:
    t = example_table(impl)
    with pytest.raises(UnknownCommand) as info:
        t.parse(b"foo/bar/baz")
    assert str(info.value) == "command 'foo' not found"
    assert isinstance(info.value, LookupError)


@each_impl
def test_slash_only_and_empty_names(impl: ModuleType) -> None:
    t = impl.CommandTable()
    t.add("cmd", "{a}")
    assert t.parse(b"cmd//") == (0, b"cmd", (b"",), b"")
    assert t.parse(b"cmd///") == (0, b"cmd", (b"",), b"/")
    for payload in (b"/", b"//", b"", b"/cmd"):
        with pytest.raises(UnknownCommand) as info:
            t.parse(payload)
        assert info.value.name == b""


@each_impl
def test_non_utf8(impl: ModuleType) -> None:
    t = impl.CommandTable()
    assert t.add(b"\xff\xfe", "{\u00e9}") == 0
    assert t.params_of(0) == ("\u00e9".encode(),)
    assert t.parse(b"\xff\xfe/x") == (0, b"\xff\xfe", (b"x",), b"")
    assert t.parse(b"\xff\xfe/\x80/\x00\xff") == (0, b"\xff\xfe", (b"\x80",), b"\x00\xff")
    with pytest.raises(UnknownCommand) as info:
        t.parse(b"\xff\xfd/x")
    assert info.value.name == b"\xff\xfd"
    assert str(info.value) == "command '\ufffd\ufffd' not found"
    assert t.find(b"\xff\xfe") == 0 and t.find(b"\xff") == -1


@each_impl
def test_long_names(impl: ModuleType) -> None:
    t = example_table(impl)
    long_name = bytes(range(256)).replace(b"/", b"_") * 400  # 100 KiB
    assert t.add(long_name, "{x}") == 4
    assert t.parse(long_name + b"/1/2/3") == (4, long_name, (b"1",), b"2/3")
    assert t.parse(long_name) == (4, long_name, (b"",), b"")
    other = long_name[:-1] + b"!"
    for payload in (other, other + b"/x", long_name + b"!", long_name[:-1]):
        with pytest.raises(UnknownCommand) as info:
            t.parse(payload)
        assert info.value.name == payload.split(b"/")[0]
    a = b"a" * (100 * 1024)
    with pytest.raises(UnknownCommand) as info:
        t.parse(a + b"/x")
    assert str(info.value) == "command '" + "a" * 256 + "...' not found"
    t.add(a)
    with pytest.raises(ValueError, match=r"command 'a{256}\.\.\.' is already registered"):
        t.add(a)


@each_impl
def test_one_mib_name(impl: ModuleType) -> None:
    t = example_table(impl)
    big = b"n" * (1 << 20)
    assert t.find(big) == -1
    with pytest.raises(UnknownCommand):
        t.parse(big + b"/data")
    t.add(big)
    assert t.parse(big + b"/data") == (4, big, (), b"data")


# -- buffers ------------------------------------------------------------------------------------


@each_impl
def test_buffers(impl: ModuleType) -> None:
    t = example_table(impl)
    payload = b"version/ab/c"  # 12 bytes
    expected = (0, b"version", (b"ab", b"c"), b"")
    assert t.parse(memoryview(payload).cast("B", (3, 4))) == expected
    assert t.parse(array.array("B", payload)) == expected
    assert t.parse(memoryview(b"xversion/ab/c")[1:]) == expected
    assert t.find(memoryview(b"xhello")[1:]) == 3
    with pytest.raises(BufferError, match="not C-contiguous"):
        t.parse(memoryview(b"vxexrxsxixoxnx")[::2])
    with pytest.raises(BufferError, match="not C-contiguous"):
        t.find(memoryview(b"hxexlxlxox")[::2])
    for bad in ("version/a", None, 5, ["version"]):
        with pytest.raises(TypeError, match=f"a bytes-like object is required, not '{type(bad).__name__}'"):
            t.parse(bad)
    released = memoryview(b"hello")
    released.release()
    with pytest.raises(ValueError):
        t.parse(released)


@each_impl
def test_bytearray_unchanged_and_resizable(impl: ModuleType) -> None:
    t = example_table(impl)
    buf = bytearray(b"hello/you/rest")
    assert t.parse(buf) == (3, b"hello", (b"you",), b"rest")
    buf += b"!"  # no export left behind
    assert t.parse(buf) == (3, b"hello", (b"you",), b"rest!")
    with pytest.raises(UnknownCommand):
        t.parse(bytearray(b"nope"))
    buf.clear()  # nor after an error


@each_impl
def test_name_length(impl: ModuleType) -> None:
    for payload, n in ((b"", 0), (b"abc", 3), (b"a/b", 1), (b"/", 0), (b"//x", 0), (b"ab/", 2), (b"\xff/", 1)):
        assert impl.name_length(payload) == n
        assert impl.name_length(bytearray(payload)) == n
        assert impl.name_length(memoryview(payload)) == n
    assert impl.name_length(b"x" * (1 << 20) + b"/") == 1 << 20
    with pytest.raises(TypeError, match="a bytes-like object is required, not 'str'"):
        impl.name_length("a/b")


# -- the table ----------------------------------------------------------------------------------


@each_impl
def test_add_errors(impl: ModuleType) -> None:
    t = impl.CommandTable()
    assert t.add("\u00e9") == 0
    with pytest.raises(ValueError, match="^command '\u00e9' is already registered$"):
        t.add("\u00e9".encode())
    with pytest.raises(ValueError, match="^command '\u00e9' is already registered$"):
        t.add("\u00e9", "{x}")
    with pytest.raises(ValueError, match="^a command name cannot contain '/': 'a/b'$"):
        t.add(b"a/b")
    with pytest.raises(ValueError, match="^a command name cannot contain '/': '/'$"):
        t.add("/")
    for empty in (b"", ""):
        with pytest.raises(ValueError, match="^a command name cannot be empty$"):
            t.add(empty)
    for bad in (bytearray(b"x"), memoryview(b"x"), 1, None):
        with pytest.raises(TypeError, match=f"^a command name must be bytes or str, not '{type(bad).__name__}'$"):
            t.add(bad)
    with pytest.raises(TypeError, match="^a pattern must be str, not 'bytes'$"):
        t.add("x", b"{a}")
    with pytest.raises(TypeError, match="^a pattern must be str, not 'NoneType'$"):
        t.add(b"", None)  # the types are checked first
    with pytest.raises(UnicodeEncodeError):
        t.add("\ud800")
    with pytest.raises(UnicodeEncodeError):
        t.add("x", "{\ud800}")
    # nothing of the failed calls stuck
    assert len(t) == 1 and t.all_names() == ["\u00e9".encode()]
    assert t.find("x") == -1
    assert t.add("x") == 1


@each_impl
def test_table_queries(impl: ModuleType) -> None:
    t = example_table(impl)
    assert len(t) == t.count == 4
    assert t.all_names() == [b"version", b"num_players", b"num_servers", b"hello"]
    t.all_names().clear()
    assert len(t.all_names()) == 4
    assert t.find(b"version") == 0 and t.find("hello") == 3 and t.find(bytearray(b"num_servers")) == 2
    for missing in (b"", b"v", b"versio", b"version/", b"version/x", b"hello\x00", "h\u00e9llo"):
        assert t.find(missing) == -1
        assert missing not in t
    assert b"num_players" in t and "num_players" in t and memoryview(b"hello") in t
    with pytest.raises(TypeError):
        _ = 5 in t
    assert [t.name_of(i) for i in range(4)] == t.all_names()
    assert t.params_of(0) == (b"data", b"description") and t.params_of(1) == () and t.params_of(3) == (b"name",)
    assert t.name_of(True) == b"num_players"
    for bad in (4, -1, -5, 1 << 70):
        with pytest.raises(IndexError, match=f"command index {bad} out of range"):
            t.name_of(bad)
        with pytest.raises(IndexError):
            t.params_of(bad)
    with pytest.raises(TypeError):
        t.name_of(1.0)
    with pytest.raises(AttributeError):
        t.count = 3
    empty = impl.CommandTable()
    assert len(empty) == 0 and empty.find(b"x") == -1 and empty.all_names() == []
    with pytest.raises(UnknownCommand):
        empty.parse(b"x/y")
    with pytest.raises(IndexError):
        empty.name_of(0)


@each_impl
def test_growth_keeps_everything(impl: ModuleType) -> None:
    t = impl.CommandTable()
    names = [f"c{i}".encode() for i in range(300)]
    for i, name in enumerate(names):
        assert t.add(name, "{p}" * (i % 3)) == i
        assert all(t.find(n) == j for j, n in enumerate(names[: i + 1]))
        assert t.find(f"c{i + 1}".encode()) == -1
    assert t.parse(b"c299/a/b") == (299, b"c299", (b"a",), b"b")


@each_impl
def test_ten_thousand_names(impl: ModuleType) -> None:
    t = impl.CommandTable()
    names = [f"cmd_{i:05d}".encode() for i in range(10_000)]
    for i, name in enumerate(names):
        assert t.add(name, "{a}/{b}" if i % 2 else "") == i
    assert len(t) == 10_000
    assert [t.find(n) for n in names] == list(range(10_000))
    assert all(t.parse(n + b"/x/y/z")[0] == i for i, n in enumerate(names))
    assert t.parse(b"cmd_00001/x/y/z") == (1, b"cmd_00001", (b"x", b"y"), b"z")
    assert t.parse(b"cmd_00002/x/y/z") == (2, b"cmd_00002", (), b"x/y/z")
    for i in range(0, 10_000, 7):
        n = names[i]
        for miss in (n + b"x", n[:-1], b"x" + n, n.upper(), f"cmd_{i + 10_000:05d}".encode()):
            assert t.find(miss) == -1


# -- the two against each other and the spec ----------------------------------------------------

ATOMS = [b"a", b"b", b"ab", b"\x00", b"\xff", b"\xc3\xa9", b"{", b"}", b"0"]
names_st = st.lists(st.sampled_from(ATOMS), min_size=1, max_size=4).map(b"".join)
patterns_st = st.text(alphabet="ab{}/\u00e9", max_size=8)
table_st = st.lists(st.tuples(st.one_of(names_st, names_st.map(lambda b: b.decode("utf-8", "replace"))),
                              patterns_st), max_size=12)
part_st = st.lists(st.sampled_from(ATOMS + [b"/"] * 6 + [b"//"]), max_size=12).map(b"".join)


@st.composite
def payload_st(draw, names: list[bytes]):
    kind = draw(st.integers(0, 3))
    if kind == 0 or not names:
        return draw(st.binary(max_size=24))
    head = draw(st.sampled_from(names)) if kind < 3 else draw(names_st)
    return head + draw(part_st)


def build(impl: ModuleType, entries) -> tuple[object, list]:
    t = impl.CommandTable()
    return t, [outcome(t.add, name, pattern) for name, pattern in entries]


@settings(max_examples=150, deadline=None)
@given(entries=table_st, data=st.data())
def test_twin_matches_core(entries, data) -> None:
    c, c_adds = build(core, entries)
    p, p_adds = build(twin, entries)
    assert c_adds == p_adds
    ref: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}
    for (name, pattern), res in zip(entries, c_adds):
        key = name.encode("utf-8") if isinstance(name, str) else name
        if res[0] == "ok":
            assert key not in ref and res[1] == len(ref)
            ref[key] = (res[1], ref_pattern(pattern))
        else:
            assert res[1] is ValueError and key in ref
    assert len(c) == len(p) == len(ref)
    assert c.all_names() == p.all_names() == list(ref)
    assert [c.params_of(i) for i in range(len(c))] == [p.params_of(i) for i in range(len(p))] \
        == [params for _, params in ref.values()]
    names = list(ref)
    for _ in range(4):
        payload = data.draw(payload_st(names))
        for cut in range(len(payload) + 1):  # every prefix: empty rest, trailing "/", missing vars
            piece = payload[:cut]
            expected = outcome(ref_parse, ref, piece)
            assert outcome(c.parse, piece) == outcome(p.parse, piece) == expected
            name = piece.split(b"/")[0]
            assert core.name_length(piece) == twin.name_length(piece) == len(name)
            assert c.find(piece) == p.find(piece) == (ref[piece][0] if piece in ref else -1)
        assert outcome(c.parse, bytearray(payload)) == outcome(p.parse, memoryview(payload)) \
            == outcome(ref_parse, ref, payload)


@settings(max_examples=150, deadline=None)
@given(pattern=st.text(alphabet=st.sampled_from("ab{}/\u00e9 \ud800"), max_size=16))
def test_pattern_twin_matches_core(pattern: str) -> None:
    # a lone surrogate gives UnicodeEncodeError: the same one (type and args) from all three
    assert outcome(core.parse_pattern, pattern) == outcome(twin.parse_pattern, pattern) \
        == outcome(ref_pattern, pattern)
