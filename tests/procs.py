"""Run the real ``teomq`` CLI in subprocesses for integration tests.

Each :class:`CliProc` is ``[sys.executable, "-m", "teomq", ...]`` with stdout and stderr
read by background threads into lists (the pipes never fill, whatever the process
prints), so a test can wait for a line, read all lines so far, signal the process or
``kill -9`` it. :class:`ProcGroup` owns the processes a fixture started and ends every
one of them at teardown, so no process outlives its test (or module).

Deadlines here are hang guards for a loaded 2-core machine, not timing assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import teomq

#: Event loops every test runs on (in-process, and as the CLI's -loop).
LOOP_KINDS = ("asyncio", "uvloop")

#: Generous default deadline (seconds) for anything a test waits for.
HANG_GUARD = 60.0

#: The directory teomq is imported from here: children import the same code.
_PACKAGE_ROOT = str(Path(teomq.__file__).resolve().parent.parent)

ADDRESS_RE = re.compile(r"^Connected to Teonet, this app address: ([0-9A-Za-z]{35})$")
LISTEN_RE = re.compile(r"^teomq broker listening on (\S+):(\d+)$")
WEB_RE = re.compile(r"^teomq web consumer on http://(\S+):(\d+)/ \(WebSocket /ws\)$")
STAT_RE = re.compile(
    r"^stat: in=(?P<in>\d+) out=(?P<out>\d+) answered=(?P<answered>\d+) queue=(?P<queue>\d+) "
    r"inflight=(?P<inflight>\d+) consumers=(?P<consumers>\d+) rate=\S+/s$"
)
DONE_RE = re.compile(r"^(?P<name>\S+) done: sent (?P<sent>\d+), answered (?P<answered>\d+), errors (?P<errors>\d+)$")


def child_env(home: Path) -> dict[str, str]:
    """Environment for a CLI child: unbuffered, its own TEOMQ_HOME, our teomq on the path."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["TEOMQ_HOME"] = str(home)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    return env


def parse_stat(line: str) -> dict[str, int] | None:
    """The counters of a broker ``stat:`` line, or None if ``line`` is not one."""
    m = STAT_RE.match(line)
    return {k: int(v) for k, v in m.groupdict().items()} if m else None


class CliProc:
    """One running CLI process whose stdout and stderr lines are collected as they come."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], label: str = "",
                 python_args: Sequence[str] | None = None, stdin: bool = False) -> None:
        self.label = label or " ".join(argv[:1])
        head = list(python_args) if python_args is not None else ["-m", "teomq"]
        self.argv = [sys.executable, *head, *argv]
        self._cond = threading.Condition()
        self._out: list[str] = []
        self._err: list[str] = []
        self._open_streams = 2
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True, bufsize=1, env=env, errors="replace",
        )
        self._threads = [
            threading.Thread(target=self._collect, args=(self.popen.stdout, self._out), daemon=True),
            threading.Thread(target=self._collect, args=(self.popen.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- collection ------------------------------------------------------------------------

    def _collect(self, stream: IO[str], into: list[str]) -> None:
        try:
            for line in stream:
                with self._cond:
                    into.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """stdout lines so far (a copy)."""
        with self._cond:
            return list(self._out)

    @property
    def err_lines(self) -> list[str]:
        """stderr lines so far (a copy)."""
        with self._cond:
            return list(self._err)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self, tail: int = 25) -> str:
        """The command, exit status and the last lines of output, for failure messages."""
        with self._cond:
            out, err = self._out[-tail:], self._err[-tail:]
        rc = self.popen.poll()
        return (f"[{self.label}] {' '.join(self.argv)}\n  exit status: {'running' if rc is None else rc}\n"
                f"  last stdout lines:\n    " + "\n    ".join(out) +
                "\n  last stderr lines:\n    " + "\n    ".join(err))

    def send_line(self, text: str) -> None:
        """Write one line to the process's stdin (started with ``stdin=True``)."""
        assert self.popen.stdin is not None, "started without stdin=True"
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    # -- waiting ---------------------------------------------------------------------------

    def wait_until(self, pred: Callable[[list[str], list[str]], object], what: str,
                   timeout: float = HANG_GUARD) -> object:
        """Wait until ``pred(stdout_lines, stderr_lines)`` is truthy; return its value.

        Fails (AssertionError with the output) if the deadline passes or the process
        ended and its output is complete without the condition becoming true.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred(self._out, self._err)
                if value:
                    return value
                if self._open_streams == 0 and self.popen.poll() is not None:
                    raise AssertionError(f"process ended before {what}\n{self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"gave up after {timeout:g} s waiting for {what}\n{self.describe()}")
                self._cond.wait(min(left, 0.5))

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = HANG_GUARD, *,
                      stderr: bool = False, start: int = 0) -> re.Match[str]:
        """The first stdout (or stderr) line from index ``start`` on that ``pattern`` matches."""
        rx = re.compile(pattern)

        def find(out: list[str], err: list[str]) -> re.Match[str] | None:
            for line in (err if stderr else out)[start:]:
                m = rx.search(line)
                if m:
                    return m
            return None

        return self.wait_until(find, f"a {'stderr' if stderr else 'stdout'} line matching {rx.pattern!r}",
                               timeout)  # type: ignore[return-value]

    def count_lines(self, pattern: str | re.Pattern[str], *, stderr: bool = False) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in (self.err_lines if stderr else self.lines) if rx.search(line))

    def wait_for_count(self, pattern: str | re.Pattern[str], n: int, timeout: float = HANG_GUARD) -> None:
        """Wait until at least ``n`` stdout lines match ``pattern``."""
        rx = re.compile(pattern)
        self.wait_until(lambda out, err: sum(1 for line in out if rx.search(line)) >= n,
                        f"{n} stdout lines matching {rx.pattern!r}", timeout)

    def wait(self, timeout: float = HANG_GUARD) -> int:
        """Wait for the process to exit and its output to be collected; its exit status."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit within {timeout:g} s\n{self.describe()}") from None
        for t in self._threads:
            t.join(timeout)
        return rc

    # -- ending ----------------------------------------------------------------------------

    def terminate(self, grace: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if still running after ``grace`` seconds (past a broker's
        -shutdown-timeout, 10 s); the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.wait()

    def kill9(self) -> int:
        """``kill -9``: no cleanup in the process at all."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        return self.wait()


class BrokerProc(tuple):
    """What :meth:`ProcGroup.broker` returns: ``(proc, address, port)``, also by name."""

    __slots__ = ()

    def __new__(cls, proc: CliProc, address: str, port: int) -> BrokerProc:
        return super().__new__(cls, (proc, address, port))

    proc = property(lambda self: self[0])
    address = property(lambda self: self[1])
    port = property(lambda self: self[2])

    @property
    def web_port(self) -> int:
        """The port of the broker's web gateway (started with ``-web :0`` unless told otherwise)."""
        return int(self.proc.wait_for_line(WEB_RE).group(2))

    @property
    def endpoint(self) -> str:
        """``<address>@127.0.0.1:<port>``: a spec that needs no address book and is verified."""
        return f"{self.address}@127.0.0.1:{self.port}"


class ProcGroup:
    """The CLI processes of one fixture; :meth:`cleanup` ends every one still running."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = child_env(home)
        self.procs: list[CliProc] = []
        self._brokers = 0

    def start(self, *argv: str, label: str = "", python_args: Sequence[str] | None = None,
              stdin: bool = False) -> CliProc:
        proc = CliProc(argv, env=self.env, label=label, python_args=python_args, stdin=stdin)
        self.procs.append(proc)
        return proc

    def broker(self, *extra: str, loop: str | None = None, data_dir: Path | None = None,
               python_args: Sequence[str] | None = None) -> BrokerProc:
        """Start ``teomq broker -listen :0 -web :0`` and wait until it listens; (proc, address, port).

        The web port is any free one (``web_port``) unless ``extra`` has ``-web`` or ``-noweb``."""
        if data_dir is None:
            self._brokers += 1
            data_dir = self.home / f"broker{self._brokers}"
        argv = ["broker", "-listen", ":0", "-data-dir", str(data_dir), *extra]
        if not any(a.lstrip("-").split("=")[0] in ("web", "noweb") for a in extra):
            argv += ["-web", ":0"]
        if python_args is not None:
            argv = argv[1:]  # teomq-broker has no subcommand
        if loop is not None:
            argv += ["-loop", loop]
        proc = self.start(*argv, label="broker", python_args=python_args)
        address = proc.wait_for_line(ADDRESS_RE).group(1)
        port = int(proc.wait_for_line(LISTEN_RE).group(2))
        return BrokerProc(proc, address, port)

    def cleanup(self) -> None:
        """SIGTERM everything still running (SIGKILL after 20 s); close the pipes."""
        for proc in reversed(self.procs):
            try:
                proc.terminate()
            except Exception:  # noqa: BLE001 - keep ending the others
                if proc.popen.poll() is None:
                    proc.popen.kill()
            for stream in (proc.popen.stdin, proc.popen.stdout, proc.popen.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
