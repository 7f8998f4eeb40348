"""CPU time, system calls and memory of processes, from getrusage and /proc (Linux).

Counters are dicts of ints: ``user_ns``, ``sys_ns`` (CPU time), ``reads``, ``writes``
(read()/write() calls, /proc/<pid>/io syscr/syscw: libuv uses them, asyncio's selector loop
uses recv()/send(), which are not counted) and ``sleeps`` (voluntary context switches: the
loop found nothing to do). Elsewhere than Linux the /proc parts read as 0.
"""

from __future__ import annotations

import os
import resource
import signal

COUNTER_KEYS = ("user_ns", "sys_ns", "reads", "writes", "sleeps")


def clock_tick_us() -> float:
    """Resolution of /proc/<pid>/stat CPU times, µs (10 ms on most kernels)."""
    return 1e6 / os.sysconf("SC_CLK_TCK")


def _proc_io(pid: int | str) -> tuple[int, int]:
    """(read-like, write-like) system calls made so far; (0, 0) if unreadable."""
    r = w = 0
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("syscr:"):
                    r = int(line.split()[1])
                elif line.startswith("syscw:"):
                    w = int(line.split()[1])
    except OSError:
        pass
    return r, w


def self_counters() -> dict[str, int]:
    """This process's counters so far (getrusage: µs resolution)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    r, w = _proc_io("self")
    return {"user_ns": int(ru.ru_utime * 1e9), "sys_ns": int(ru.ru_stime * 1e9),
            "reads": r, "writes": w, "sleeps": ru.ru_nvcsw}


def proc_counters(pid: int) -> dict[str, int] | None:
    """Another process's counters (/proc/<pid>/stat utime/stime in clock ticks); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        sleeps = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    sleeps = int(line.split()[1])
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # comm may hold spaces: split after it
    tick_ns = 10**9 // os.sysconf("SC_CLK_TCK")
    r, w = _proc_io(pid)
    return {"user_ns": int(fields[11]) * tick_ns, "sys_ns": int(fields[12]) * tick_ns,
            "reads": r, "writes": w, "sleeps": sleeps}


def proc_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; (0, 0) if unreadable."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def delta(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    """b - a per key (never negative); None if either is missing."""
    if a is None or b is None:
        return None
    return {k: max(0, b[k] - a[k]) for k in a}


def summed(counters: list[dict[str, int] | None]) -> dict[str, int] | None:
    """Key-wise sum of the counters that exist; None if none does."""
    present = [c for c in counters if c]
    if not present:
        return None
    return {k: sum(c.get(k, 0) for c in present) for k in COUNTER_KEYS}


def set_pdeathsig() -> None:
    """In a server child (``preexec_fn``): get SIGTERM if the harness dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
