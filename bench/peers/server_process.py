"""Start and stop the private peer servers: loopback only, free ports, data under the workdir.

Every server is started in its own session (a Ctrl-C meant for the harness does not reach it;
the harness stops it in order) with ``PR_SET_PDEATHSIG`` so it gets SIGTERM if the harness is
killed with -9. ``stop`` signals only the process started here, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from teomq.benchmark.driver import Server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(cmd: Sequence[str], log_path: str, env: dict[str, str] | None = None,
          cwd: str | None = None) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed with the Popen
    try:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=_pdeathsig)  # noqa: PLW1509 - one prctl call, no lock taken
    finally:
        log.close()


def tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    return os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args))


def wait_port(port: int, proc: subprocess.Popen[bytes], log_path: str, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{_name(proc)} exited with {proc.returncode}: {tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{_name(proc)} not listening on {port} after {timeout:g} s: {tail(log_path)}")
        time.sleep(0.05)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: only this process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def start_listening(cmd: Sequence[str], port: int, log_path: str, url: str, version: str) -> Server:
    """Spawn a server that listens on 127.0.0.1:port; a Server once it accepts connections."""
    proc = spawn(cmd, log_path)
    try:
        wait_port(port, proc, log_path)
    except BaseException:
        terminate(proc)
        raise
    return Server(url=url, pid=proc.pid, stop=once(lambda: terminate(proc)), version=version, log=log_path)


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """A stop() that does its work on the first call only (the harness and run_all may both call it)."""
    called = [False]

    def stop() -> None:
        if not called[0]:
            called[0] = True
            fn()

    return stop
