"""The harness: one benchmark run over any Driver, from server start to the result document.

Timeline, one monotonic clock for every process (workers.py says what the clients do)::

    start the server through the driver (or take --broker), purge the queue
    spawn the client groups: consumers first, each connected before the producers are spawned
    rpc, publish, timed:   start = now + 0.25 s; window [start + warmup, + duration); producers
                           stop sending at its end, wait for what is in flight (rpc) or drain()
                           (publish), then every group is told to stop and report
    rpc, publish, counted: the window runs from start until every producer has its answers
                           (rpc) or the consumers have N messages (publish)
    drain:                 phase "fill": the producers publish N, then drain() (accepted by the
                           server); phase "drain": the consumers connect and the window runs
                           until they have N messages

The server's CPU time, system calls and RSS are read from /proc at the window's edges; the
clients read their own (getrusage) and report them with their latency samples. Every process
started here is stopped at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from teomq.benchmark.driver import Driver, Server
from teomq.benchmark.loader import load_driver
from teomq.benchmark.proc_stats import delta, proc_counters, proc_rss_kib
from teomq.benchmark.progress import NoProgress
from teomq.benchmark.workers import Config, group_main, shares
from teomq.loops import run as run_loop

START_DELAY_NS = 250_000_000  # "go" to first send: every process has received "go" by then
CONNECT_TIMEOUT = 60.0  # spawning and connecting all clients (9+ interpreters on 2 cores)
POLL_S = 0.25


class BenchError(Exception):
    """The run could not be completed; the message says why."""


@dataclass
class GroupProc:
    """A client process as the harness sees it."""

    members: list[tuple[str, int]]
    proc: Any  # multiprocessing.Process
    ctrl: multiprocessing.connection.Connection  # harness -> group
    out: multiprocessing.connection.Connection  # group -> harness
    pid: int | None = None
    ready: bool = False
    produced: int = 0
    consumed: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    @property
    def roles(self) -> set[str]:
        return {r for r, _ in self.members}

    @property
    def label(self) -> str:
        return ", ".join(f"{r} {i}" for r, i in self.members[:4]) + (" ..." if len(self.members) > 4 else "")


class Harness:
    """Owns every process of one run; ``close()`` stops all of them whatever happened."""

    def __init__(self, cfg: Config, progress: NoProgress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or NoProgress()
        self.ctx = multiprocessing.get_context("spawn")
        self.driver: Driver = load_driver(cfg.driver, cfg.options, list(cfg.sys_path))
        self.driver.loop = cfg.loop
        self.server: Server | None = None
        self.own_server = False
        self.workdir = ""
        self.groups: list[GroupProc] = []
        self._phase: tuple[str, int, int, int | None] | None = None  # label source for the bar

    # -- processes -----------------------------------------------------------------------

    def start_server(self) -> Server:
        cfg = self.cfg
        self.workdir = tempfile.mkdtemp(prefix=f"teomq-bench-{self.driver.name or 'driver'}-")
        if cfg.broker:
            self.server = Server.external(cfg.broker, cfg.broker_pid)
        else:
            try:
                self.server = self.driver.start_server(self.workdir)
            except Exception as exc:
                raise BenchError(f"{self.driver.name or cfg.driver}: cannot start the server: {exc}") from exc
            self.own_server = True
        try:
            run_loop(self.driver.purge(self.server.url, cfg.queue), cfg.loop)
        except Exception as exc:
            raise BenchError(f"cannot purge {cfg.queue!r} at {self.server.url}: {exc!r}") from exc
        return self.server

    def spawn(self, members_list: list[list[tuple[str, int]]]) -> list[GroupProc]:
        assert self.server is not None
        n = sum(len(m) for m in members_list)
        roles = {r for m in members_list for r, _ in m}
        what = roles.pop() if len(roles) == 1 else "client"
        self.progress.status(f"starting {n} {what}{'s' if n > 1 else ''} "
                             f"in {len(members_list)} process{'es' if len(members_list) > 1 else ''} ...")
        group = []
        for members in members_list:
            ctrl_r, ctrl_w = self.ctx.Pipe(duplex=False)
            out_r, out_w = self.ctx.Pipe(duplex=False)
            name = f"bench-{members[0][0]}-{members[0][1]}" if len(members) == 1 else "bench-clients"
            proc = self.ctx.Process(target=group_main, args=(members, self.cfg, self.server.url, ctrl_r, out_w),
                                    name=name, daemon=True)
            proc.start()
            ctrl_r.close()
            out_w.close()
            g = GroupProc(members, proc, ctrl_w, out_r)
            self.groups.append(g)
            group.append(g)
        self.pump(lambda: all(g.ready for g in group), time.monotonic_ns() + int(CONNECT_TIMEOUT * 1e9),
                  "the clients to connect")
        return group

    def send(self, msg: tuple[Any, ...], groups: list[GroupProc] | None = None) -> None:
        for g in groups if groups is not None else self.groups:
            g.ctrl.send(msg)

    def server_log_tail(self, n: int = 2000) -> str:
        if self.server is None or not self.server.log:
            return ""
        try:
            with open(self.server.log, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- the parent's event loop ---------------------------------------------------------

    def pump(self, until: Any = None, deadline_ns: int | None = None, what: str = "") -> None:
        """Handle the clients' messages until ``until()`` is true or ``deadline_ns`` passes.

        With ``until``, the deadline is a hang guard (BenchError); without one, the deadline
        is the point to return at. Counted waits with no deadline fail after ``cfg.timeout``
        seconds without progress.
        """
        last_total = -1
        last_change = time.monotonic()
        while True:
            if until is not None and until():
                return
            now = time.monotonic_ns()
            if deadline_ns is not None and now >= deadline_ns:
                if until is None:
                    return
                raise BenchError(f"timed out waiting for {what}")
            total = sum(g.produced + g.consumed for g in self.groups)
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif until is not None and deadline_ns is None and time.monotonic() - last_change > self.cfg.timeout:
                raise BenchError(f"no progress for {self.cfg.timeout:g} s while waiting for {what}")
            wait = POLL_S if deadline_ns is None else max(0.0, min(POLL_S, (deadline_ns - now) / 1e9))
            live = [g for g in self.groups if g.result is None]
            objs: list[Any] = [g.out for g in live] + [g.proc.sentinel for g in live]
            by_obj = {**{g.out: g for g in live}, **{g.proc.sentinel: g for g in live}}
            if not objs:
                time.sleep(wait)
            for obj in multiprocessing.connection.wait(objs, wait) if objs else ():
                g = by_obj[obj]
                if g.result is not None:
                    continue
                if obj is g.out:
                    self._read(g)
                else:  # exited: read what it left in the pipe first
                    while g.result is None and g.out.poll():
                        self._read(g)
                    if g.result is None:
                        self._died(g)
            self._draw()

    def _read(self, g: GroupProc) -> None:
        try:
            msg = g.out.recv()
        except (EOFError, OSError):
            self._died(g)
        kind = msg[0]
        if kind == "progress":
            g.produced, g.consumed = msg[1], msg[2]
        elif kind == "finished":
            g.finished[msg[1]] = msg[2]
        elif kind == "ready":
            g.pid, g.ready = msg[1], True
        elif kind == "result":
            if msg[1].get("aborted"):
                raise BenchError(f"{g.label} stopped before finishing its work")
            g.result = msg[1]
        elif kind == "error":
            raise BenchError(f"client process failed:\n{msg[1]}" + self._log_hint())
        else:
            raise BenchError(f"{g.label} sent {kind!r}")

    def _died(self, g: GroupProc) -> None:
        g.proc.join(1)
        raise BenchError(f"{g.label} exited (code {g.proc.exitcode}) without reporting" + self._log_hint())

    def _log_hint(self) -> str:
        tail = self.server_log_tail()
        return f"\nserver output (tail):\n{tail}" if tail else ""

    def _draw(self) -> None:
        if self._phase is None:
            return
        label, start, ws, we = self._phase
        now = time.monotonic_ns()
        wl = self.cfg.workload
        produced = sum(g.produced for g in self.groups)
        consumed = sum(g.consumed for g in self.groups)
        count = produced if wl == "rpc" or label == "fill" else consumed
        if we is not None:  # timed: seconds since start
            self.progress.update(max(0.0, (now - start) / 1e9), count, "warmup" if now < ws else "measure")
        else:
            self.progress.update(count, count)

    # -- runs ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the configured workload; return the raw figures for report.build()."""
        cfg = self.cfg
        self.progress.status(f"starting {self.driver.name or 'the'} server ..." if not cfg.broker else
                             f"using {cfg.broker} ...")
        server = self.start_server()
        consumers = [("consumer", i) for i in range(cfg.consumers)]
        producers = [("producer", i) for i in range(cfg.producers)]
        if cfg.procs:
            self.spawn([[m] for m in consumers])
            self.spawn([[m] for m in producers])
        else:
            self.spawn([consumers + producers])
        raw: dict[str, Any] = {"server": server, "phases": {}}
        if cfg.workload == "drain":
            self._drain(raw)
        elif cfg.count:
            self._counted(raw)
        else:
            self._timed(raw)
        self.progress.finish()
        self.send(("stop",))
        self.pump(lambda: all(g.result is not None for g in self.groups),
                  time.monotonic_ns() + int((cfg.timeout + 30) * 1e9), "the clients' reports")
        raw["groups"] = [g.result for g in self.groups]
        raw["driver"] = self.driver
        return raw

    def _broker(self) -> dict[str, int] | None:
        pid = self.server.pid if self.server else None
        return proc_counters(pid) if pid else None

    def _rss(self) -> tuple[int, int]:
        pid = self.server.pid if self.server else None
        return proc_rss_kib(pid) if pid else (0, 0)

    def _producer_groups(self) -> list[GroupProc]:
        return [g for g in self.groups if "producer" in g.roles]

    def _timed(self, raw: dict[str, Any]) -> None:
        cfg = self.cfg
        start = time.monotonic_ns() + START_DELAY_NS
        ws = start + int(cfg.warmup * 1e9)
        we = ws + int(cfg.duration * 1e9)
        self.send(("go", "run", start, ws, we, [0] * cfg.producers))
        self.progress.phase("warmup" if cfg.warmup else "measure", cfg.warmup + cfg.duration, "s")
        self._phase = ("run", start, ws, we)
        self.pump(deadline_ns=ws)
        b0 = self._broker()
        self.pump(deadline_ns=we)
        b1 = self._broker()
        rss = self._rss()
        self._phase = None
        producers = self._producer_groups()
        self.pump(lambda: all("run" in g.finished for g in producers),
                  time.monotonic_ns() + int((cfg.timeout + 30) * 1e9), "the producers to finish")
        raw["phases"]["run"] = {"start_ns": start, "ws": ws, "we": we, "end_ns": we, "window_s": cfg.duration,
                                "broker": delta(b0, b1), "rss": rss}

    def _counted(self, raw: dict[str, Any]) -> None:
        cfg = self.cfg
        start = time.monotonic_ns() + START_DELAY_NS
        self.send(("go", "run", start, start, None, shares(cfg.count, cfg.producers)))
        self.progress.phase(cfg.workload, cfg.count, "msg")
        self._phase = ("run", start, start, None)
        self.pump(deadline_ns=start)
        b0 = self._broker()
        producers = self._producer_groups()
        if cfg.workload == "rpc":
            self.pump(lambda: all("run" in g.finished for g in producers), None, "the answers")
        else:
            self.pump(lambda: sum(g.consumed for g in self.groups) >= cfg.count, None, "the consumers")
        b1 = self._broker()
        end = time.monotonic_ns()
        rss = self._rss()
        self._phase = None
        if cfg.workload != "rpc":  # the producers' drain() may still be under way
            self.pump(lambda: all("run" in g.finished for g in producers),
                      time.monotonic_ns() + int((cfg.timeout + 30) * 1e9), "the producers to finish")
        raw["phases"]["run"] = {"start_ns": start, "ws": start, "we": None, "end_ns": end, "broker": delta(b0, b1),
                                "rss": rss}

    def _drain(self, raw: dict[str, Any]) -> None:
        cfg = self.cfg
        producers = self._producer_groups()
        consumers = [g for g in self.groups if "consumer" in g.roles]
        start = time.monotonic_ns() + START_DELAY_NS
        self.send(("go", "fill", start, start, None, shares(cfg.count, cfg.producers)), producers)
        self.progress.phase("fill", cfg.count, "msg")
        self._phase = ("fill", start, start, None)
        self.pump(deadline_ns=start)
        f0 = self._broker()
        self.pump(lambda: all("fill" in g.finished for g in producers), None, "the producers to fill the queue")
        f1 = self._broker()
        end = time.monotonic_ns()
        rss_full = self._rss()
        raw["phases"]["fill"] = {"start_ns": start, "ws": start, "we": None, "end_ns": end,
                                 "broker": delta(f0, f1), "rss": rss_full}
        start = time.monotonic_ns() + START_DELAY_NS
        self.send(("go", "drain", start, start, None, shares(cfg.count, cfg.producers)), consumers)
        self.progress.phase("drain", cfg.count, "msg")
        self._phase = ("drain", start, start, None)
        self.pump(deadline_ns=start)
        d0 = self._broker()
        self.pump(lambda: sum(g.consumed for g in self.groups) >= cfg.count, None, "the consumers to drain the queue")
        d1 = self._broker()
        end = time.monotonic_ns()
        self._phase = None
        raw["phases"]["drain"] = {"start_ns": start, "ws": start, "we": None, "end_ns": end,
                                  "broker": delta(d0, d1), "rss": self._rss()}

    def close(self) -> None:
        """Stop every client and the server: politely first, then terminate/kill (also on a second Ctrl-C)."""
        self.progress.finish()
        try:
            for g in self.groups:
                with contextlib.suppress(OSError, ValueError):
                    g.ctrl.send(("stop",))
            deadline = time.monotonic() + 10.0
            for g in self.groups:
                g.proc.join(max(0.1, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        for g in self.groups:
            if g.proc.is_alive():
                g.proc.terminate()
                g.proc.join(3)
            if g.proc.is_alive():
                g.proc.kill()
                g.proc.join()
            g.ctrl.close()
            g.out.close()
        if self.own_server and self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
