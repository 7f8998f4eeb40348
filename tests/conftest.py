"""Shared fixtures: the compiled-core check, event loops, and CLI processes.

- The run refuses to start unless the Cython core is the compiled extension
  (set TEOMQ_ALLOW_PURE=1 to run anyway), as aiokafka's conftest does.
- ``loop_kind`` / ``arun``: in-process tests run once on the stdlib loop, once on uvloop.
- ``cli_loop``: integration tests run the CLI processes with ``-loop asyncio`` and ``-loop uvloop``.
- ``procs`` / ``module_procs``: start ``python -m teomq ...`` processes; all of them are
  ended when the test (module) ends. ``procs.broker()`` returns ``(proc, address, port)``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import HANG_GUARD, LOOP_KINDS, ProcGroup

CORE_MODULES = ("dispatch", "frame_codec", "crc32c", "ring_queue", "client_core", "command_parser", "routes", "teoproxy")


# -- the compiled core ------------------------------------------------------------------


def _core_problems() -> list[str]:
    problems = []
    for name in CORE_MODULES:
        modname = f"teomq._core.{name}"
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            problems.append(f"{modname} cannot be imported: {e}")
            continue
        path = getattr(mod, "__file__", None) or ""
        if not path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            problems.append(f"{modname} is not a compiled extension: {path or '(no __file__)'}")
    return problems


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("TEOMQ_ALLOW_PURE") == "1":
        return
    problems = _core_problems()
    if problems:
        pytest.exit(
            "the compiled teomq core was not loaded:\n  " + "\n  ".join(problems) +
            "\nBuild it with `pip install -e '.[test]'` (ci/test.sh) or, after that, "
            "`python setup.py build_ext --inplace`, "
            "or set TEOMQ_ALLOW_PURE=1 to run the tests without it.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


# -- event loops --------------------------------------------------------------------------


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Which event loop an in-process test runs on: "asyncio" or "uvloop"."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


@pytest.fixture
def arun(loop_kind: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``arun(coro)``: run ``coro`` to completion on a fresh loop of kind ``loop_kind``.

    The whole coroutine gets a generous deadline: a hang guard, not a timing assertion.
    """

    def run(coro: Coroutine[Any, Any, Any], timeout: float = HANG_GUARD) -> Any:
        with asyncio.Runner(loop_factory=loop_factory(loop_kind)) as runner:
            loop = runner.get_loop()
            if loop_kind == "uvloop":
                import uvloop

                assert isinstance(loop, uvloop.Loop)
            else:
                assert type(loop).__module__.startswith("asyncio")
            return runner.run(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture(params=LOOP_KINDS)
def cli_loop(request: pytest.FixtureRequest) -> str:
    """The ``-loop`` value the CLI processes of an integration test run with."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


# -- isolation and processes -----------------------------------------------------------------


@pytest.fixture
def teomq_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TEOMQ_HOME (address book, default data dir) for an in-process test."""
    home = tmp_path / "teomq_home"
    home.mkdir()
    monkeypatch.setenv("TEOMQ_HOME", str(home))
    return home


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcGroup]:
    """Start CLI processes for one test (``procs.start(...)``, ``procs.broker(...)``)."""
    group = ProcGroup(tmp_path / "teomq_home")
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def ex(procs: ProcGroup) -> ProcGroup:
    """``procs`` whose CLI processes can import the examples package (the repository root on the path)."""
    procs.env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + procs.env["PYTHONPATH"]
    return procs


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcGroup]:
    """Like ``procs``, for processes shared by the tests of one module."""
    group = ProcGroup(tmp_path_factory.mktemp("module") / "teomq_home")
    try:
        yield group
    finally:
        group.cleanup()
