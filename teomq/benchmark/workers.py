"""Client processes: a *group* of producer and consumer workers on one event loop.

With ``--procs`` (the default) every worker is a group of its own, in its own process; with
``--no-procs`` one process holds a single group of all of them. A group talks to the harness
over two one-way pipes::

    harness -> group   ("go", phase, start, ws, we, shares)   phase "run" (everyone), "fill"
                                                            (producers), "drain" (consumers)
                       ("stop",)                            consumers stop; then report
    group -> harness   ("ready", pid)                       connected (drain consumers: imported)
                       ("progress", produced, consumed)     every 0.25 s
                       ("finished", phase, mono_ns)         every producer of the phase is done
                       ("result", doc) | ("error", text)

Times are ``time.monotonic_ns`` (CLOCK_MONOTONIC, shared by every process on Linux): ``start``
= first send, ``[ws, we)`` = the measured window; ``we`` is None for counted runs (``shares``
= messages per producer index), whose window ends when the group's work is done.

Workloads, per producer: ``rpc`` keeps W requests in flight (W slots; each answer sends the
slot's next request), timing each round trip with perf_counter_ns; ``publish`` publishes in
batches of W, yielding to the loop (or pausing, with ``--rate``) and awaiting writable() between
batches, with the payload's
first 8 bytes = monotonic_ns at send (consumers compute one-way latency); ``drain`` publishes
its share likewise, unstamped, then awaits drain(). Consumers echo (rpc) or return None.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import multiprocessing.connection
import os
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teomq.benchmark.driver import ConsumerSide, Driver, ProducerSide
from teomq.benchmark.loader import load_driver
from teomq.benchmark.proc_stats import delta, self_counters
from teomq.loops import run as run_loop

PROGRESS_S = 0.25
_STAMP = struct.Struct("<q")
_INF = float("inf")


@dataclass(frozen=True)
class Config:
    """One run's parameters, as every process sees them."""

    workload: str  # "rpc" | "publish" | "drain"
    producers: int
    consumers: int
    inflight: int
    size: int
    duration: float  # seconds of measured window; 0 for a counted run
    count: int  # messages in all for a counted run; 0 for a timed run
    warmup: float
    procs: bool
    loop: str
    driver: str  # resolved spec (teomq.benchmark.loader)
    options: dict[str, str] = field(default_factory=dict)
    sys_path: tuple[str, ...] = ()
    broker: str = ""  # a running server's URL; "" = the driver starts one
    broker_pid: int | None = None
    timeout: float = 60.0  # hang guard: most seconds without progress
    profile_dir: str = ""
    rate: float = 0.0  # publish: messages/s of all producers together; 0 = as fast as flow control allows

    @property
    def queue(self) -> str:
        return f"teomq-bench-{self.workload}"


def shares(total: int, n: int) -> list[int]:
    """``total`` split over ``n`` producers as evenly as possible (first ones get the rest)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


async def recv(conn: multiprocessing.connection.Connection) -> Any:
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
            # libuv's poll handle leaves the fd non-blocking; a later blocking recv() of a
            # large message would then fail half-way
            os.set_blocking(fd, True)
    try:
        return conn.recv()
    except EOFError:
        return ("stop",)


def _schedule(at_mono_ns: int, fn: Callable[[], None]) -> asyncio.TimerHandle:
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, (at_mono_ns - time.monotonic_ns()) / 1e9), fn)


async def _sleep_until(at_mono_ns: int) -> None:
    await asyncio.sleep(max(0.0, (at_mono_ns - time.monotonic_ns()) / 1e9))


class _Window:
    """Marks of the measured window of one phase in this process: CPU counters."""

    def __init__(self) -> None:
        self.c0: dict[str, int] | None = None
        self.c1: dict[str, int] | None = None

    def start(self) -> None:
        if self.c0 is None:
            self.c0 = self_counters()

    def end(self) -> None:
        if self.c1 is None:
            self.start()
            self.c1 = self_counters()

    def spent(self) -> dict[str, int] | None:
        return delta(self.c0, self.c1)


class _Marks:
    """progress() at the measured window's start and end, taken once each."""

    n0: int | None = None
    n1: int | None = None

    def progress(self) -> int:
        raise NotImplementedError

    def mark_start(self) -> None:
        if self.n0 is None:
            self.n0 = self.progress()

    def mark_end(self) -> None:
        if self.n1 is None:
            self.mark_start()
            self.n1 = self.progress()


# -- producers ------------------------------------------------------------------------------


class ProducerWorker(_Marks):
    role = "producer"

    def __init__(self, driver: Driver, url: str, index: int, cfg: Config) -> None:
        self.driver, self.url, self.index, self.cfg = driver, url, index, cfg
        self.side: ProducerSide | None = None
        self.sent = 0  # requests or messages sent
        self.answered = 0  # rpc: answers (not errors)
        self.errors = 0
        self.lat = array.array("q")
        self.finished_ns = 0

    async def connect(self) -> None:
        self.side = await self.driver.producer(self.url, self.index, self.cfg.workload, self.cfg.queue)

    def progress(self) -> int:
        """What the harness shows and counts: answers (rpc) or messages sent (publish, drain)."""
        return self.answered if self.cfg.workload == "rpc" else self.sent

    async def run(self, start: int, ws: int, we: int | None, share: int) -> None:
        await _sleep_until(start)
        if self.cfg.workload == "rpc":
            await self._rpc(ws, we, share)
        else:
            await self._publish(we, share, stamp=self.cfg.workload == "publish")
        self.finished_ns = time.monotonic_ns()

    async def _rpc(self, ws_mono: int, we_mono: int | None, share: int) -> None:
        assert self.side is not None
        loop = asyncio.get_running_loop()
        pc = time.perf_counter_ns
        # perf_counter_ns and monotonic_ns are both CLOCK_MONOTONIC on Linux; convert anyway
        shift = pc() - time.monotonic_ns()
        ws = ws_mono + shift
        we = we_mono + shift if we_mono is not None else _INF
        request = self.side.request
        payload = os.urandom(self.cfg.size)
        append = self.lat.append
        t0s = [0] * self.cfg.inflight
        finished: asyncio.Future[None] = loop.create_future()
        # counted run: requests left to send (a timed run never reaches 0)
        left = share if we_mono is None else -1
        outstanding = 0

        def fail(exc: BaseException) -> None:
            if not finished.done():
                finished.set_exception(exc)

        def slot(i: int) -> Callable[[BaseException | None], None]:
            def done(err: BaseException | None) -> None:
                nonlocal left, outstanding
                now = pc()
                outstanding -= 1
                if err is None:
                    self.answered += 1
                    if ws <= now < we:
                        append(now - t0s[i])
                else:
                    self.errors += 1
                if left == 0 or now >= we or finished.done():
                    if not outstanding and not finished.done():
                        finished.set_result(None)
                    return
                left -= 1
                outstanding += 1
                self.sent += 1
                t0s[i] = pc()
                try:
                    request(payload, done)
                except Exception as exc:  # e.g. the connection is gone: fail the run
                    outstanding -= 1
                    fail(exc)

            return done

        for i in range(self.cfg.inflight):
            if left == 0:
                break
            left -= 1
            outstanding += 1
            self.sent += 1
            t0s[i] = pc()
            request(payload, slot(i))
        if not outstanding:
            return
        await finished

    async def _publish(self, we_mono: int | None, share: int, stamp: bool) -> None:
        assert self.side is not None
        side = self.side
        publish = side.publish
        writable = side.writable
        mono = time.monotonic_ns
        pack = _STAMP.pack
        stamp = stamp and self.cfg.size >= _STAMP.size
        body = os.urandom(self.cfg.size - _STAMP.size if stamp else self.cfg.size)
        batch = self.cfg.inflight
        left = share if we_mono is None else -1
        # paced (--rate): batch k leaves at start + k * interval; behind schedule, no pause
        interval = batch * self.cfg.producers / self.cfg.rate if self.cfg.rate > 0 else 0.0
        due = time.monotonic()
        while left != 0:
            n = batch if left < 0 else min(batch, left)
            if stamp:
                for _ in range(n):
                    publish(pack(mono()) + body)
            else:
                for _ in range(n):
                    publish(body)
            self.sent += n
            if left > 0:
                left -= n
            elif we_mono is not None and mono() >= we_mono:
                break
            if interval:
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)  # let the client write what it buffered
            await writable()
        await side.drain()

    def result(self) -> dict[str, Any]:
        refused = getattr(self.side, "refused", 0) if self.side is not None else 0
        return {"role": self.role, "index": self.index, "sent": self.sent, "answered": self.answered,
                "errors": self.errors, "refused": int(refused or 0), "in_window": (self.n1 or 0) - (self.n0 or 0),
                "latency_ns": self.lat.tobytes(), "finished_ns": self.finished_ns}


# -- consumers ------------------------------------------------------------------------------


def _echo(data: bytes) -> bytes:
    return data


class ConsumerWorker(_Marks):
    role = "consumer"

    def __init__(self, driver: Driver, url: str, index: int, cfg: Config) -> None:
        self.driver, self.url, self.index, self.cfg = driver, url, index, cfg
        self.side: ConsumerSide | None = None
        self.ws = self.we = _INF  # latency window (monotonic ns), set by go
        self.lat = array.array("q")
        self.first_ns = 0
        self.last_ns = 0
        self.connected_ns = 0

    def handler(self) -> Callable[[bytes], Any]:
        if self.cfg.workload == "rpc":
            return _echo
        mono = time.monotonic_ns
        append = self.lat.append
        unpack = _STAMP.unpack_from
        if self.cfg.workload == "publish" and self.cfg.size >= _STAMP.size:
            def stamped(data: bytes) -> None:
                now = mono()
                if not self.first_ns:
                    self.first_ns = now
                self.last_ns = now
                if self.ws <= now < self.we:
                    append(now - unpack(data)[0])

            return stamped

        def counted(data: bytes) -> None:
            now = mono()
            if not self.first_ns:
                self.first_ns = now
            self.last_ns = now

        return counted

    async def connect(self) -> None:
        self.side = await self.driver.consumer(self.url, self.index, self.cfg.workload, self.cfg.queue,
                                               self.handler())
        self.connected_ns = time.monotonic_ns()

    def progress(self) -> int:
        return self.side.count if self.side is not None else 0

    def result(self) -> dict[str, Any]:
        return {"role": self.role, "index": self.index, "received": self.progress(),
                "in_window": (self.n1 or 0) - (self.n0 or 0), "latency_ns": self.lat.tobytes(),
                "first_ns": self.first_ns, "last_ns": self.last_ns, "connected_ns": self.connected_ns}


# -- a group ---------------------------------------------------------------------------------


class Group:
    """The workers of one process and their conversation with the harness."""

    def __init__(self, members: list[tuple[str, int]], cfg: Config, url: str,
                 ctrl: multiprocessing.connection.Connection, out: multiprocessing.connection.Connection) -> None:
        self.cfg, self.url, self.ctrl, self.out = cfg, url, ctrl, out
        driver = load_driver(cfg.driver, cfg.options, list(cfg.sys_path))
        driver.loop = cfg.loop
        self.workers: list[Any] = [
            (ProducerWorker if role == "producer" else ConsumerWorker)(driver, url, index, cfg)
            for role, index in members
        ]
        self.windows: dict[str, _Window] = {}
        self.tasks: list[asyncio.Future[None]] = []
        self.failed: asyncio.Future[None] | None = None
        self._ticker: asyncio.TimerHandle | None = None

    def _send(self, msg: tuple[Any, ...]) -> None:
        self.out.send(msg)

    def _tick(self) -> None:
        produced = sum(w.progress() for w in self.workers if w.role == "producer")
        consumed = sum(w.progress() for w in self.workers if w.role == "consumer")
        with contextlib.suppress(OSError, ValueError):
            self._send(("progress", produced, consumed))
        self._ticker = asyncio.get_running_loop().call_later(PROGRESS_S, self._tick)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.failed = loop.create_future()
        late = self.cfg.workload == "drain"
        for w in self.workers:
            if not (late and w.role == "consumer"):
                await w.connect()
        self._send(("ready", os.getpid()))
        self._tick()
        control = asyncio.ensure_future(self._control())
        try:
            await asyncio.wait({control, self.failed}, return_when=asyncio.FIRST_COMPLETED)
            if self.failed.done():
                self.failed.result()  # raises what failed
            control.result()
            for window in self.windows.values():
                window.end()
            for w in self.workers:
                w.mark_end()
            if self.tasks:
                pending = [t for t in self.tasks if not t.done()]
                if pending:  # stopped early (Ctrl-C, another process failed)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return {"aborted": True}
                for t in self.tasks:
                    t.result()
            doc = {"pid": os.getpid(), "roles": sorted({w.role for w in self.workers}),
                   "windows": {k: v.spent() for k, v in self.windows.items()},
                   "workers": [w.result() for w in self.workers]}
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            control.cancel()
            for w in self.workers:
                if w.side is not None:
                    await w.side.close()
        return doc

    async def _control(self) -> None:
        while True:
            msg = await recv(self.ctrl)
            if msg[0] == "stop":
                return
            if msg[0] == "go":
                self._go(*msg[1:])

    def _go(self, phase: str, start: int, ws: int, we: int | None, share_of: list[int]) -> None:
        roles = {"run": ("producer", "consumer"), "fill": ("producer",), "drain": ("consumer",)}[phase]
        members = [w for w in self.workers if w.role in roles]
        window = self.windows[phase] = _Window()

        def open_window() -> None:
            window.start()
            for w in members:
                w.mark_start()

        def close_window() -> None:
            window.end()
            for w in members:
                w.mark_end()

        _schedule(ws, open_window)
        if we is not None:
            _schedule(we, close_window)
        producers = [w for w in members if w.role == "producer"]
        consumers = [w for w in members if w.role == "consumer"]
        for w in consumers:
            w.ws, w.we = ws, (we if we is not None else _INF)
            if w.side is None:
                self._track(asyncio.ensure_future(self._connect_at(w, start)))
        if not producers:
            return
        tasks = [asyncio.ensure_future(w.run(start, ws, we, share_of[w.index])) for w in producers]
        for t in tasks:
            self._track(t)

        def all_done(_: Any) -> None:
            if not all(t.done() for t in tasks) or any(t.cancelled() or t.exception() for t in tasks):
                return
            if we is None and not consumers:  # counted run: this group's work is over
                close_window()
            with contextlib.suppress(OSError, ValueError):
                self._send(("finished", phase, max(w.finished_ns for w in producers)))

        for t in tasks:
            t.add_done_callback(all_done)

    async def _connect_at(self, w: ConsumerWorker, start: int) -> None:
        await _sleep_until(start)
        await w.connect()

    def _track(self, task: asyncio.Future[None]) -> None:
        self.tasks.append(task)

        def check(t: asyncio.Future[None]) -> None:
            if not t.cancelled() and t.exception() is not None and self.failed and not self.failed.done():
                self.failed.set_exception(t.exception())  # type: ignore[arg-type]

        task.add_done_callback(check)


def group_main(members: list[tuple[str, int]], cfg: Config, url: str,
               ctrl: multiprocessing.connection.Connection, out: multiprocessing.connection.Connection) -> None:
    """Entry point of a spawned client process: run the group, send ("result", doc) or ("error", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness decides when we stop
    for p in reversed(cfg.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    label = ", ".join(f"{r} {i}" for r, i in members[:4]) + (" ..." if len(members) > 4 else "")
    profiler = None
    if cfg.profile_dir:
        import cProfile

        # Wall-clock timer (cProfile's default): a CPU-time timer costs a system call per event
        # and more than doubled the clients' CPU. So on a loaded machine a function that writes
        # to a socket is also charged for the time it sat preempted.
        profiler = cProfile.Profile()
    try:
        group = Group(members, cfg, url, ctrl, out)
        if profiler is not None:
            profiler.enable()
        try:
            result = run_loop(group.run(), cfg.loop)
        finally:
            if profiler is not None:
                profiler.disable()
                name = "-".join(f"{r}-{i}" for r, i in members) if len(members) == 1 else "clients"
                profiler.dump_stats(os.path.join(cfg.profile_dir, f"{name}.prof"))
        out.send(("result", result))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            out.send(("error", f"{label}: {traceback.format_exc()}"))
        raise SystemExit(1) from None
