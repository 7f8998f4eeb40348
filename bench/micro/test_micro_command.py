"""Command parser: CommandTable.parse of the Cython core against the pure-Python twin.

Groups (one call = lookup of the name + the (index, name, vars, data) tuple):
    command-num_players/42    b"num_players/42", no pattern: vars (), data b"42"
    command-version/a/b/c/d   b"version/a/b/c/d", pattern "{data}/{description}": vars (b"a", b"b"), data b"c/d"
    command-reject-1MiB       a 1 MiB name that is not registered -> UnknownCommand (memchr, hash, raise)

Each parse group runs on a table of 4 names and one of 10,000 (the same 4 plus 9,996 others):
open addressing at load factor <= 0.5 makes the lookup cost independent of the table's size.
The same payload is parsed every round, so the probed slot is in cache; these figures are
the parse's own cost, not the cache misses of a broker walking many names.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

import teomq._core.command_parser as c_cmd
import teomq._py.command_parser as py_cmd
from teomq.errors import UnknownCommand

assert not c_cmd.__file__.endswith(".py"), "teomq._core.command_parser is not the compiled module"

# pytest-benchmark's calibration picks 1 or 100 iterations a round from run to run for a ~100 ns
# call, and with 1 the timer's own cost doubles the C figure: a fixed 100 a round keeps it out.
ITERATIONS = 100
ROUNDS = 2000

IMPLS = [pytest.param(c_cmd, id="C"), pytest.param(py_cmd, id="pure")]
SIZES = [pytest.param(4, id="4names"), pytest.param(10_000, id="10000names")]

BASE = [("version", "{data}/{description}"), ("num_players", ""), ("num_servers", ""), ("hello", "{name}")]


def make_table(impl: ModuleType, size: int) -> Any:
    table = impl.CommandTable()
    for name, pattern in BASE:
        table.add(name, pattern)
    for i in range(size - len(BASE)):
        table.add(f"cmd_{i:05d}", "{a}" if i % 2 else "")
    assert len(table) == size
    return table


@pytest.mark.benchmark(group="command-num_players/42")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_parse_num_players(benchmark: Any, report: Any, impl: ModuleType, size: int) -> None:
    table = make_table(impl, size)
    result = benchmark.pedantic(table.parse, args=(b"num_players/42",), iterations=ITERATIONS, rounds=ROUNDS,
                                warmup_rounds=10)
    assert result == (1, b"num_players", (), b"42")
    report(item="parse", names=size)


@pytest.mark.benchmark(group="command-version/a/b/c/d")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_parse_version(benchmark: Any, report: Any, impl: ModuleType, size: int) -> None:
    table = make_table(impl, size)
    result = benchmark.pedantic(table.parse, args=(b"version/a/b/c/d",), iterations=ITERATIONS, rounds=ROUNDS,
                                warmup_rounds=10)
    assert result == (0, b"version", (b"a", b"b"), b"c/d")
    report(item="parse", names=size)


@pytest.mark.benchmark(group="command-reject-1MiB")
@pytest.mark.parametrize("impl", IMPLS)
def test_reject_long_name(benchmark: Any, report: Any, impl: ModuleType) -> None:
    table = make_table(impl, 4)
    payload = b"n" * (1 << 20) + b"/data"

    def reject() -> None:
        try:
            table.parse(payload)
        except UnknownCommand:
            return
        raise AssertionError("a 1 MiB name was found")

    benchmark.pedantic(reject, iterations=1, rounds=500, warmup_rounds=5)
    report(item="reject", nbytes=len(payload))
