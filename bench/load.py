#!/usr/bin/env python3
"""End-to-end load generator: real broker, real sockets, producers and consumers in separate processes.

Usage (from anywhere; the repository root is put on sys.path)::

    python bench/load.py --producers 4 --consumers 4 --inflight 32 --size 100 --duration 10 \\
        [--warmup 2] [--broker HOST:PORT [--broker-pid PID]] [--loop uvloop|asyncio] \\
        [--mode send|request] [--prefetch 64] [--json out.json] [--profile DIR]

Unless ``--broker`` is given it starts its own broker through the CLI,
``python -m teomq broker -listen 127.0.0.1:0 -nomsg -data-dir <tmp>`` with ``TEOMQ_HOME=<tmp>``,
and reads the port from its ``listening on`` line.

Each producer process keeps exactly ``--inflight`` requests outstanding (closed loop: every
answer sends the next one) and times each round trip with ``perf_counter_ns``. Each consumer
process echoes (its handler returns the payload). Timeline, one monotonic clock for all processes::

    spawn consumers, wait until all are connected; spawn producers, wait until all are connected
    start      = now + 0.25 s            every producer starts sending
    window     = [start + warmup, start + warmup + duration)
    end        producers stop sending new requests, wait for the ones in flight, report

Figures (all over the measured window; bench/README.md says more):
    round trips/s       answers received inside the window, all producers, / window length
    latency             send() -> answer callback of those answers (raw samples, merged)
    broker CPU/rt       broker utime+stime (/proc/<pid>/stat) / round trips, user and sys apart
    producer CPU/req    producers' getrusage(RUSAGE_SELF) utime+stime / round trips
    consumer CPU/msg    consumers' utime+stime / messages they received in the window
    reads/writes/sleeps read()/write() calls (/proc/<pid>/io syscr/syscw; uvloop only) and
                        voluntary context switches (the loop went to sleep), per round trip
    broker RSS          VmRSS and VmHWM from /proc/<pid>/status at the end of the window

``--mode send`` (the default) drives the closed loop with ``Producer.send(data, callback)``;
``--mode request`` runs ``inflight`` tasks each awaiting ``Producer.request``. send() is the
faster of the two (no Task and Future per request): see bench/README.md for the figures.

Every process started here is stopped at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

START_DELAY_NS = 250_000_000  # "go" to first send: every process has received "go" by then
CONNECT_TIMEOUT = 60.0  # spawning and connecting all clients (9+ interpreters on 2 cores)
BROKER_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Config:
    producers: int
    consumers: int
    inflight: int
    size: int
    duration: float
    warmup: float
    loop: str
    mode: str
    prefetch: int
    timeout: float
    broker: str = ""
    profile_dir: str = ""


# =====================================================================================
# child processes
# =====================================================================================


def _echo(data: bytes) -> bytes:
    return data


def _proc_io(pid: int | str) -> tuple[int, int]:
    """(read-like, write-like) system calls made so far, from /proc/<pid>/io; (0, 0) if unreadable."""
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
    """This process's CPU time (ns), read/write system calls and voluntary context switches so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    r, w = _proc_io("self")
    return {"user_ns": int(ru.ru_utime * 1e9), "sys_ns": int(ru.ru_stime * 1e9),
            "reads": r, "writes": w, "sleeps": ru.ru_nvcsw}


def _delta(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int]:
    if a is None or b is None:
        return {}
    return {k: max(0, b[k] - a[k]) for k in a}


async def _recv(conn: multiprocessing.connection.Connection) -> Any:
    """Wait for the next control message without blocking the loop; EOF -> ("stop",)."""
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while not conn.poll():
        ready: asyncio.Future[None] = loop.create_future()

        def wake(ready: asyncio.Future[None] = ready) -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
            # libuv's poll handle leaves the fd non-blocking; a large send() on it would then
            # fail half-way (BlockingIOError) and corrupt the stream
            os.set_blocking(fd, True)
    try:
        return conn.recv()
    except EOFError:
        return ("stop",)


class _Window:
    """Start and end marks of the measured window in this process: self_counters() and a count."""

    def __init__(self, counter: Callable[[], int]) -> None:
        self.counter = counter
        self.c0: dict[str, int] | None = None
        self.c1: dict[str, int] | None = None
        self.n0 = self.n1 = 0

    def start(self) -> None:
        if self.c0 is None:
            self.c0, self.n0 = self_counters(), self.counter()

    def end(self) -> None:
        if self.c1 is None:
            self.start()
            self.c1, self.n1 = self_counters(), self.counter()

    def spent(self) -> dict[str, int]:
        """CPU ns (user_ns, sys_ns), reads, writes and sleeps in the window."""
        return _delta(self.c0, self.c1)


def _schedule(loop: asyncio.AbstractEventLoop, at_mono_ns: int, fn: Callable[[], None]) -> None:
    loop.call_later(max(0.0, (at_mono_ns - time.monotonic_ns()) / 1e9), fn)


async def _run_producer(index: int, cfg: Config, conn: multiprocessing.connection.Connection) -> dict[str, Any]:
    from teomq.client import Producer
    from teomq.errors import ConnectionLost, TeomqError

    loop = asyncio.get_running_loop()
    producer = Producer(cfg.broker, name=f"load-producer-{index}", timeout=cfg.timeout)
    await producer.connect()
    conn.send(("ready", os.getpid()))
    msg = await _recv(conn)
    if msg[0] != "go":
        await producer.close()
        return {"aborted": True}
    _, start_mono, ws_mono, we_mono = msg
    # perf_counter_ns and monotonic_ns are both CLOCK_MONOTONIC on Linux; convert anyway
    shift = time.perf_counter_ns() - time.monotonic_ns()
    ws, we = ws_mono + shift, we_mono + shift
    payload = os.urandom(cfg.size)
    lat = array.array("q")
    errors = [0]
    window = _Window(lambda: len(lat))
    done = loop.create_future()
    pc = time.perf_counter_ns
    _schedule(loop, ws_mono, window.start)
    _schedule(loop, we_mono, window.end)
    await asyncio.sleep(max(0.0, (start_mono - time.monotonic_ns()) / 1e9))

    if cfg.mode == "send":
        sent: dict[int, int] = {}
        send = producer.send
        append = lat.append

        def on_answer(mid: int, answer: bytes | None, err: BaseException | None) -> None:
            now = pc()
            t0 = sent.pop(mid)
            if err is None:
                if ws <= now < we:
                    append(now - t0)
            else:
                errors[0] += 1
                if isinstance(err, ConnectionLost):
                    if not done.done():
                        done.set_exception(err)
                    return
            if now >= we:
                window.end()
                if not sent and not done.done():
                    done.set_result(None)
                return
            t = pc()
            try:
                sent[send(payload, on_answer)] = t
            except Exception as exc:  # the client would log and swallow it: fail the run instead
                if not done.done():
                    done.set_exception(exc)

        for _ in range(cfg.inflight):
            t = pc()
            sent[send(payload, on_answer)] = t
        running: asyncio.Future[Any] = done
    else:
        request = producer.request

        async def worker() -> None:
            append = lat.append
            while True:
                t0 = pc()
                try:
                    await request(payload)
                except ConnectionLost:
                    raise
                except TeomqError:
                    errors[0] += 1
                    now = pc()
                else:
                    now = pc()
                    if ws <= now < we:
                        append(now - t0)
                if now >= we:
                    window.end()
                    return

        running = asyncio.gather(*(worker() for _ in range(cfg.inflight)))
    # the parent may stop us early (Ctrl-C, another process failed)
    stop = asyncio.ensure_future(_recv(conn))
    await asyncio.wait((running, stop), return_when=asyncio.FIRST_COMPLETED)
    if not running.done():
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await producer.close()
        return {"aborted": True}
    stop.cancel()
    await asyncio.gather(stop, return_exceptions=True)
    running.result()
    window.end()
    await producer.close()
    return {
        "pid": os.getpid(),
        "answered": len(lat),
        "errors": errors[0],
        **window.spent(),
        "latency_ns": lat.tobytes(),
        "sent_total": producer.stats["sent"],
    }


async def _run_consumer(index: int, cfg: Config, conn: multiprocessing.connection.Connection) -> dict[str, Any]:
    from teomq.client import Consumer

    loop = asyncio.get_running_loop()
    consumer = Consumer(cfg.broker, _echo, name=f"load-consumer-{index}", prefetch=cfg.prefetch,
                        timeout=cfg.timeout)
    await consumer.start()
    conn.send(("ready", os.getpid()))
    msg = await _recv(conn)
    if msg[0] != "go":
        await consumer.close()
        return {"aborted": True}
    _, _start, ws_mono, we_mono = msg
    stats = consumer.stats
    window = _Window(lambda: stats["received"])
    _schedule(loop, ws_mono, window.start)
    _schedule(loop, we_mono, window.end)
    while (await _recv(conn))[0] != "stop":
        pass
    window.end()
    await consumer.close()
    return {
        "pid": os.getpid(),
        "messages": window.n1 - window.n0,
        **window.spent(),
        "errors": stats["errors"],
        "received_total": stats["received"],
    }


def _child_main(role: str, index: int, cfg: Config, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a spawned client process: run, send ("result", dict) or ("error", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    factory = None
    if cfg.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    run = _run_producer if role == "producer" else _run_consumer
    profiler = None
    if cfg.profile_dir:
        import cProfile

        # Wall-clock timer (cProfile's default): a CPU-time timer costs a system call per event
        # and more than doubled the clients' CPU. So on a loaded machine a function that writes
        # to a socket (_flush) is also charged for the time it sat preempted.
        profiler = cProfile.Profile()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            if profiler is not None:
                profiler.enable()
            try:
                result = runner.run(run(index, cfg, conn))
            finally:
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(os.path.join(cfg.profile_dir, f"{role}-{index}.prof"))
        conn.send(("result", result))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{role} {index}: {traceback.format_exc()}"))
        raise SystemExit(1) from None


# =====================================================================================
# parent: broker, children, measurement
# =====================================================================================


class LoadError(Exception):
    pass


def _clk_tck() -> int:
    return os.sysconf("SC_CLK_TCK")


def proc_counters(pid: int) -> dict[str, int]:
    """What self_counters() gives, for another process: utime/stime (/proc/<pid>/stat fields 14
    and 15, clock ticks, converted to ns), /proc/<pid>/io system calls, voluntary context switches."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()  # comm may hold spaces: split after it
    tick_ns = 10**9 // _clk_tck()
    sleeps = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                sleeps = int(line.split()[1])
    r, w = _proc_io(pid)
    return {"user_ns": int(fields[11]) * tick_ns, "sys_ns": int(fields[12]) * tick_ns,
            "reads": r, "writes": w, "sleeps": sleeps}


def proc_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def _set_pdeathsig() -> None:
    """In the broker child: get SIGTERM if this harness dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Broker:
    """A broker started through the CLI in a private TEOMQ_HOME."""

    def __init__(self, loop: str) -> None:
        self.home = tempfile.mkdtemp(prefix="teomq-load-")
        self.stderr_path = os.path.join(self.home, "broker.stderr")
        env = dict(os.environ, TEOMQ_HOME=self.home)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-nomsg",
               "-data-dir", os.path.join(self.home, "broker"), "-loop", loop, "-log-level", "WARNING"]
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env, cwd=ROOT,
                                     start_new_session=True,  # Ctrl-C reaches us; we stop it
                                     preexec_fn=_set_pdeathsig)
        self.pid = self.proc.pid
        self.endpoint = ""
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:  # also keeps draining stdout afterwards
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if " listening on " in line and not self.endpoint:
                    self.endpoint = line.rsplit(" ", 1)[1]
                    found.set()
            found.set()

        threading.Thread(target=read, name="broker-stdout", daemon=True).start()
        if not found.wait(BROKER_START_TIMEOUT) or not self.endpoint:
            self.stop()
            raise LoadError(f"broker did not report 'listening on' within {BROKER_START_TIMEOUT:g} s; "
                            f"stdout: {lines!r}; stderr: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stderr.close()
        shutil.rmtree(self.home, ignore_errors=True)


@dataclass
class Child:
    role: str
    index: int
    proc: Any  # multiprocessing.Process
    conn: multiprocessing.connection.Connection
    result: dict[str, Any] | None = None


class Harness:
    """Owns every process of one run; ``close()`` stops all of them whatever happened."""

    def __init__(self, cfg: Config, broker_pid: int | None) -> None:
        self.cfg = cfg
        self.broker: Broker | None = None
        self.broker_pid = broker_pid
        self.children: list[Child] = []
        self.ctx = multiprocessing.get_context("spawn")

    def start_broker(self) -> None:
        self.broker = Broker(self.cfg.loop)
        self.broker_pid = self.broker.pid
        self.cfg = Config(**{**asdict(self.cfg), "broker": self.broker.endpoint})

    def spawn(self, role: str, count: int) -> None:
        group = []
        for i in range(count):
            parent_conn, child_conn = self.ctx.Pipe()
            proc = self.ctx.Process(target=_child_main, args=(role, i, self.cfg, child_conn),
                                    name=f"load-{role}-{i}", daemon=True)
            proc.start()
            child_conn.close()
            child = Child(role, i, proc, parent_conn)
            self.children.append(child)
            group.append(child)
        self.expect(group, "ready", CONNECT_TIMEOUT)

    def expect(self, group: list[Child], kind: str, timeout: float) -> None:
        """Wait for one ``kind`` message from every child of ``group``; raise on error or death."""
        deadline = time.monotonic() + timeout
        waiting = {c.conn: c for c in group}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(f"{c.role} {c.index}" for c in waiting.values())
                raise LoadError(f"no {kind!r} within {timeout:g} s from: {names}")
            sentinels = {c.proc.sentinel: c for c in waiting.values()}
            for obj in multiprocessing.connection.wait([*waiting, *sentinels], left):
                child = waiting.get(obj) if obj in waiting else sentinels.get(obj)  # type: ignore[call-overload]
                if child is None or child.conn not in waiting:
                    continue
                try:
                    msg = child.conn.recv()
                except (EOFError, OSError):
                    self._died(child)
                if msg[0] == "error":
                    raise LoadError(f"client process failed:\n{msg[1]}")
                if msg[0] != kind:
                    raise LoadError(f"{child.role} {child.index} sent {msg[0]!r}, expected {kind!r}")
                if kind == "result":
                    child.result = msg[1]
                del waiting[child.conn]

    def _died(self, child: Child) -> None:
        child.proc.join(1)
        extra = self.broker.stderr_tail() if self.broker else ""
        raise LoadError(f"{child.role} {child.index} exited (code {child.proc.exitcode}) without reporting"
                        + (f"; broker stderr: {extra}" if extra else ""))

    def broadcast(self, msg: tuple[Any, ...], role: str | None = None) -> None:
        for c in self.children:
            if role is None or c.role == role:
                c.conn.send(msg)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if not cfg.broker:
            self.start_broker()
            cfg = self.cfg
        self.spawn("consumer", cfg.consumers)
        self.spawn("producer", cfg.producers)
        now = time.monotonic_ns()
        start = now + START_DELAY_NS
        ws = start + int(cfg.warmup * 1e9)
        we = ws + int(cfg.duration * 1e9)
        self.broadcast(("go", start, ws, we))
        pid = self.broker_pid
        _sleep_until(ws)
        b0 = proc_counters(pid) if pid else None
        _sleep_until(we)
        b1 = proc_counters(pid) if pid else None
        rss = proc_rss_kib(pid) if pid else (0, 0)
        producers = [c for c in self.children if c.role == "producer"]
        consumers = [c for c in self.children if c.role == "consumer"]
        self.expect(producers, "result", cfg.timeout + 30.0)
        self.broadcast(("stop",), "consumer")
        self.expect(consumers, "result", cfg.timeout + 30.0)
        return aggregate(cfg, [c.result for c in producers], [c.result for c in consumers],  # type: ignore[misc]
                         _delta(b0, b1) or None, rss, pid)

    def close(self) -> None:
        """Stop every child and the broker: politely first, then terminate/kill (also on a second Ctrl-C)."""
        try:
            for c in self.children:
                with contextlib.suppress(OSError, ValueError):
                    c.conn.send(("stop",))
            deadline = time.monotonic() + 10.0
            for c in self.children:
                c.proc.join(max(0.1, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        for c in self.children:
            if c.proc.is_alive():
                c.proc.terminate()
                c.proc.join(3)
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join()
            c.conn.close()
        if self.broker is not None:
            self.broker.stop()


def _sleep_until(mono_ns: int) -> None:
    while True:
        left = (mono_ns - time.monotonic_ns()) / 1e9
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


# =====================================================================================
# results
# =====================================================================================


def _percentiles(samples_ns: list[bytes], qs: tuple[float, ...]) -> tuple[list[float], int, float, float]:
    """Merge raw int64 samples; return (nearest-rank percentiles in µs, count, max µs, mean µs)."""
    try:
        import numpy as np
    except ImportError:  # numpy is a test extra: sort in Python instead (slower, same figures)
        merged: list[int] = []
        for b in samples_ns:
            merged.extend(array.array("q", b))
        if not merged:
            return [math.nan] * len(qs), 0, math.nan, math.nan
        merged.sort()
        n = len(merged)
        pct = [merged[max(0, math.ceil(q / 100 * n) - 1)] / 1e3 for q in qs]
        return pct, n, merged[-1] / 1e3, sum(merged) / n / 1e3
    arr = np.concatenate([np.frombuffer(b, dtype=np.int64) for b in samples_ns] or [np.zeros(0, np.int64)])
    if arr.size == 0:
        return [math.nan] * len(qs), 0, math.nan, math.nan
    values = np.percentile(arr, qs, method="inverted_cdf") / 1e3  # nearest rank, as above
    return [float(x) for x in values], int(arr.size), float(arr.max()) / 1e3, float(arr.mean()) / 1e3


QUANTILES = (50.0, 90.0, 99.0, 99.9)


def aggregate(cfg: Config, producers: list[dict[str, Any]], consumers: list[dict[str, Any]],
              broker_spent: dict[str, int] | None, rss: tuple[int, int],
              broker_pid: int | None) -> dict[str, Any]:
    """One result document from the children's reports and the broker's /proc figures."""
    window = cfg.duration
    round_trips = sum(p["answered"] for p in producers)
    messages = sum(c["messages"] for c in consumers)
    pct, n, mx, mean = _percentiles([p["latency_ns"] for p in producers], QUANTILES)

    def figures(spent: dict[str, int] | None, count: int, unit: str) -> dict[str, Any]:
        """Per-``unit`` CPU (µs, user/sys), system calls and sleeps from summed counters."""
        keys = ("cpu_us", "user_us", "sys_us", "reads", "writes", "sleeps")
        if not spent or not count:
            return {**{f"{k}_per_{unit}": None for k in keys}, "cpu_percent_of_core": None}
        total_us = (spent["user_ns"] + spent["sys_ns"]) / 1e3
        values = (total_us, spent["user_ns"] / 1e3, spent["sys_ns"] / 1e3,
                  spent["reads"], spent["writes"], spent["sleeps"])
        out: dict[str, Any] = {f"{k}_per_{unit}": round(v / count, 3 if k in keys[3:] else 2)
                               for k, v in zip(keys, values, strict=True)}
        if (spent["reads"] + spent["writes"]) * 1000 < count:
            # /proc/<pid>/io counts read()/write() (uvloop, via libuv) but not recv()/send()
            # (asyncio's selector loop), whose few counts are then the control pipe's
            out[f"reads_per_{unit}"] = out[f"writes_per_{unit}"] = None
        out["cpu_percent_of_core"] = round(total_us / 1e6 / window * 100, 1)
        return out

    def summed(group: list[dict[str, Any]]) -> dict[str, int]:
        keys = ("user_ns", "sys_ns", "reads", "writes", "sleeps")
        return {k: sum(x.get(k, 0) for x in group) for k in keys}

    broker = {"pid": broker_pid, **figures(broker_spent, round_trips, "round_trip"),
              "rss_kib": rss[0] or None, "peak_rss_kib": rss[1] or None, "clock_tick_us": 1e6 / _clk_tck()}
    prod = {**figures(summed(producers), round_trips, "request"),
            "answered_per_process": [p["answered"] for p in producers]}
    cons = {"messages": messages, **figures(summed(consumers), messages, "message"),
            "messages_per_process": [c["messages"] for c in consumers]}
    parts = [x["cpu_percent_of_core"] for x in (broker, prod, cons) if x["cpu_percent_of_core"] is not None]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "profile_dir"},
        "cpus": os.cpu_count(),
        "window_s": window,
        "round_trips": round_trips,
        "round_trips_per_s": round(round_trips / window, 1),
        "latency_us": {
            **{f"p{q:g}": round(v, 1) for q, v in zip(QUANTILES, pct, strict=True)},
            "max": round(mx, 1), "mean": round(mean, 1), "samples": n,
        },
        "errors": sum(p["errors"] for p in producers) + sum(c["errors"] for c in consumers),
        "cpu_percent_of_core_all": round(sum(parts), 1),
        "broker": broker,
        "producers": prod,
        "consumers": cons,
    }


def format_table(r: dict[str, Any]) -> str:
    """The result as a markdown-ish table."""
    c = r["config"]
    lat = r["latency_us"]
    b, p, k = r["broker"], r["producers"], r["consumers"]

    def num(v: Any, fmt: str = ",.1f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def cpu(d: dict[str, Any], unit: str, who: str) -> str:
        return (f"{num(d[f'cpu_us_per_{unit}'], '.2f')}  (user {num(d[f'user_us_per_{unit}'], '.2f')} + "
                f"sys {num(d[f'sys_us_per_{unit}'], '.2f')}; {num(d['cpu_percent_of_core'])} % of a core{who})")

    def calls(d: dict[str, Any], unit: str) -> str:
        return (f"{num(d[f'reads_per_{unit}'], '.3f')} / {num(d[f'writes_per_{unit}'], '.3f')} / "
                f"{num(d[f'sleeps_per_{unit}'], '.3f')}")

    rows = [
        ("round trips/s", f"{num(r['round_trips_per_s'], ',.0f')}  ({r['round_trips']:,} in {r['window_s']:g} s)"),
        ("latency p50 / p90 / p99 / p99.9 µs",
         " / ".join(num(lat[f"p{q:g}"]) for q in QUANTILES) + f"  (max {num(lat['max'])}, {lat['samples']:,} samples)"),
        ("broker CPU µs / round trip", cpu(b, "round_trip", "")),
        ("broker RSS MiB (peak)", f"{num(b['rss_kib'] and b['rss_kib'] / 1024)} "
                                  f"({num(b['peak_rss_kib'] and b['peak_rss_kib'] / 1024)})"),
        ("producer CPU µs / request", cpu(p, "request", ", all producers")),
        ("consumer CPU µs / message", cpu(k, "message", f", all consumers; {k['messages']:,} messages")),
        ("reads / writes / sleeps per rt: broker", calls(b, "round_trip")),
        ("  per request: producers", calls(p, "request")),
        ("  per message: consumers", calls(k, "message")),
        ("CPU of all processes", f"{num(r['cpu_percent_of_core_all'])} % of a core ({r['cpus']} CPUs here)"),
        ("errors", str(r["errors"])),
    ]
    head = (f"teomq load: {c['producers']} producers x {c['consumers']} consumers, inflight {c['inflight']}, "
            f"{c['size']} B, {c['duration']:g} s (+{c['warmup']:g} s warmup), loop {c['loop']}, mode {c['mode']}, "
            f"prefetch {c['prefetch']}, broker {c['broker']} (pid {b['pid']})")
    width = max(len(name) for name, _ in rows)
    lines = [head, "", f"| {'figure':<{width}} | value", f"|{'-' * (width + 2)}|{'-' * 40}"]
    lines += [f"| {name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


# =====================================================================================
# command line
# =====================================================================================


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _nonneg_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a non-negative number")
    return v


def build_parser() -> argparse.ArgumentParser:
    try:
        import uvloop  # noqa: F401

        default_loop = "uvloop"
    except ImportError:
        default_loop = "asyncio"
    ap = argparse.ArgumentParser(prog="bench/load.py", description="teomq end-to-end load generator.")
    ap.add_argument("--producers", type=_positive_int, default=4, help="producer processes (default 4)")
    ap.add_argument("--consumers", type=_positive_int, default=4, help="consumer processes (default 4)")
    ap.add_argument("--inflight", type=_positive_int, default=32, help="requests outstanding per producer (default 32)")
    ap.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    ap.add_argument("--duration", type=_nonneg_float, default=10.0, help="measured window, seconds (default 10)")
    ap.add_argument("--warmup", type=_nonneg_float, default=2.0, help="load before the window, seconds (default 2)")
    ap.add_argument("--broker", default="", metavar="HOST:PORT",
                    help="use this broker instead of starting one (its CPU/RSS only with --broker-pid)")
    ap.add_argument("--broker-pid", type=int, default=None, help="pid of the --broker process, for CPU and RSS")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop,
                    help=f"event loop of the clients and of the broker started here (default {default_loop})")
    ap.add_argument("--mode", choices=("send", "request"), default="send",
                    help="send(data, callback) closed loop, or inflight tasks awaiting request() (default send)")
    ap.add_argument("--prefetch", type=_positive_int, default=64, help="consumer prefetch (default 64)")
    ap.add_argument("--timeout", type=float, default=10.0, help="request timeout, seconds (default 10)")
    ap.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="cProfile every client process into DIR/<role>-<n>.prof")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0:
        print("bench/load.py: --duration must be positive", file=sys.stderr)
        return 2
    if args.size < 0:
        print("bench/load.py: --size must be >= 0", file=sys.stderr)
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    cfg = Config(producers=args.producers, consumers=args.consumers, inflight=args.inflight, size=args.size,
                 duration=args.duration, warmup=args.warmup, loop=args.loop, mode=args.mode,
                 prefetch=args.prefetch, timeout=args.timeout, broker=args.broker,
                 profile_dir=os.path.abspath(args.profile) if args.profile else "")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # also when started in the background by a shell, which sets SIGINT to "ignore"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    harness = Harness(cfg, args.broker_pid if args.broker else None)
    try:
        result = harness.run()
    except KeyboardInterrupt:
        print("bench/load.py: interrupted, stopping everything", file=sys.stderr)
        return 130
    except LoadError as e:
        print(f"bench/load.py: {e}", file=sys.stderr)
        return 1
    finally:
        harness.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    try:
        print(format_table(result), flush=True)
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
