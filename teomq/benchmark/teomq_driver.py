"""The teomq Driver: a broker started through the CLI, teomq.client.Producer and Consumer.

- Server: ``python -m teomq broker -listen 127.0.0.1:0 -nomsg -noweb -data-dir <workdir>/broker
  -loop <loop> -storage memory`` (``-o log=1``: without ``-nomsg``; ``-o storage=disk``: the
  queues on disk) with ``TEOMQ_HOME=<workdir>`` (its own address book and key); the port is
  read from its ``listening on`` line. Durability "memory", or "disk, fsync POLICY".
- rpc: ``Producer.send(data, callback)`` (no Task or Future per request: the faster of the
  client's two request APIs, see bench/README.md), or with option ``mode=request`` a task per
  request awaiting ``Producer.request``. Consumers answer with a plain (sync) echo handler.
- publish/drain: ``Producer.publish`` (NO_REPLY); writable() is ``Producer.drain`` (transport
  flow control); drain() then waits until the broker has read every byte sent (see
  :func:`_socket_barrier`; ``Client.ping()`` instead, once the client has one), so the queue
  holds every message when it returns. Consumers' handler returns None (acknowledged without
  an answer).

Options (``--option KEY=VALUE``): ``prefetch`` (consumer credit, default 64), ``timeout``
(request timeout s, default 10), ``mode`` (send|request), ``queue_max`` (the broker's
``-queue-max``, default 1,000,000: raise it for ``drain --count`` above that), ``log`` (1: the
broker logs every message, its default, with ``-log-level INFO``; its stderr goes to a file in
the work directory; default 0: ``-nomsg -log-level WARNING``), ``storage`` (the broker's
``-storage``: default memory, as the peers' drivers keep theirs; disk: the queues in the work
directory), ``fsync`` (its ``-fsync``, default always), ``confirm`` (1: publish/drain wait for the
broker's confirmations, ``Client.confirmed``: writable() until at most ``confirm_window``
(default 0) are unconfirmed, drain() until none; default 0: accepted is enough), ``delayed``
(N: before the run, N 100-byte messages published into the benchmark's queue with a delay of an
hour and confirmed: a broker with that many delayed messages pending; default 0).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import teomq
from teomq.benchmark.driver import (
    ConsumerSide,
    Done,
    Driver,
    Handler,
    ProducerSide,
    Server,
)
from teomq.benchmark.proc_stats import set_pdeathsig

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
BARRIER_TIMEOUT = 60.0
#: the directory teomq is imported from: the broker runs the same code
_PACKAGE_ROOT = str(Path(teomq.__file__).resolve().parent.parent)


def _in_thread(coro: Any) -> None:
    """Run ``coro`` to its end on an event loop of its own (start_server may be called from one)."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    t = threading.Thread(target=run, name="teomq-preload")
    t.start()
    t.join()
    if error:
        raise error[0]


async def _publish_delayed(url: str, count: int) -> None:
    """``count`` messages delayed by an hour, confirmed: pending in the broker for the whole run."""
    from teomq.client import Producer

    async with Producer(url, name="bench-delayed", timeout=60.0) as p:
        for i in range(count):
            p.publish(b"d" * 100, delay=3600.0)
            if i % 1024 == 1023:
                await p.confirmed(4096)
        await p.confirmed(0)


class TeomqDriver(Driver):
    name = "teomq"
    description = ("teomq.client: Producer.send(data, callback) for rpc, publish() + drain() for "
                   "publish/drain; Consumer with a sync handler (echo, or None for publish/drain)")
    durability = "memory"

    def _opt(self, key: str, default: str) -> str:
        return str(self.options.get(key, default))

    def start_server(self, workdir: str) -> Server:
        env = dict(os.environ, TEOMQ_HOME=workdir)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log_on = self._opt("log", "0") not in ("0", "false", "no", "")
        storage = self._opt("storage", "memory")
        self.durability = "memory" if storage == "memory" else f"{storage}, fsync {self._opt('fsync', 'always')}"
        if self._opt("confirm", "0") not in ("0", ""):
            self.durability += (f"; publish/drain confirmed (at most {self._opt('confirm_window', '0')} unconfirmed "
                                "after each batch)")
        cmd = [sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-noweb",
               "-data-dir", os.path.join(workdir, "broker"), "-loop", self.loop,
               "-queue-max", self._opt("queue_max", "1000000"),
               "-storage", self._opt("storage", "memory"), "-fsync", self._opt("fsync", "always"),
               *(["-log-level", "INFO"] if log_on else ["-nomsg", "-log-level", "WARNING"])]
        log_path = os.path.join(workdir, "broker.stderr")
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
                                env=env, cwd=workdir,
                                start_new_session=True,  # Ctrl-C reaches the harness, which stops it
                                preexec_fn=set_pdeathsig)
        endpoint: list[str] = []
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:  # keeps draining stdout for the broker's whole life
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if len(lines) < 20:
                    lines.append(line)
                if " listening on " in line and not endpoint:
                    endpoint.append(line.rsplit(" ", 1)[1])
                    found.set()
            found.set()

        threading.Thread(target=read, name="teomq-broker-stdout", daemon=True).start()

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(2)  # SIGINT: the broker's orderly stop
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log_file.close()

        if not found.wait(START_TIMEOUT) or not endpoint:
            stop()
            tail = Path(log_path).read_bytes()[-2000:].decode("utf-8", "replace")
            raise RuntimeError(f"teomq broker did not report 'listening on' within {START_TIMEOUT:g} s; "
                               f"stdout: {lines!r}; stderr: {tail}")
        delayed = int(self._opt("delayed", "0"))
        if delayed:
            try:
                _in_thread(_publish_delayed(endpoint[0], delayed))
            except BaseException:
                stop()
                raise
        return Server(url=endpoint[0], pid=proc.pid, stop=stop, version=teomq.__version__, log=log_path)

    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide:
        from teomq.client import Producer

        client = Producer(url, name=f"bench-producer-{index}", timeout=float(self._opt("timeout", "10")))
        await client.connect()
        return _TeomqProducer(client, self._opt("mode", "send"), int(self._opt("confirm", "0")) != 0,
                              int(self._opt("confirm_window", "0")))

    async def consumer(self, url: str, index: int, workload: str, queue: str,
                       handler: Handler) -> ConsumerSide:
        from teomq.client import Consumer

        client = Consumer(url, handler, name=f"bench-consumer-{index}", prefetch=int(self._opt("prefetch", "64")),
                          timeout=float(self._opt("timeout", "10")))
        await client.start()
        return _TeomqConsumer(client)

    async def purge(self, url: str, queue: str) -> None:
        """Nothing: a broker started here is new, and teomq has no purge command yet."""


class _TeomqProducer(ProducerSide):
    #: send() callbacks, one per distinct ``done`` (the harness reuses one per in-flight slot)
    _MAX_ADAPTERS = 4096

    def __init__(self, client: Any, mode: str, confirm: bool = False, window: int = 0) -> None:
        if mode not in ("send", "request"):
            raise ValueError(f"teomq driver: mode must be send or request, not {mode!r}")
        self._client = client
        self._confirm = confirm
        self._window = window
        self._send = client.send
        self._adapters: dict[Done, Callable[[int, Any, Any], None]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.publish = client.publish  # type: ignore[method-assign]  # one call layer less per message
        if mode == "request":
            self.request = self._request_task  # type: ignore[method-assign]

    @property
    def refused(self) -> int:  # type: ignore[override]  # a read-only view of the base's attribute
        return int(self._client.stats["refused"])

    def request(self, payload: bytes, done: Done) -> None:
        cb = self._adapters.get(done)
        if cb is None:
            if len(self._adapters) >= self._MAX_ADAPTERS:
                self._adapters.clear()
            cb = self._adapters[done] = lambda _mid, _answer, err: done(err)
        self._send(payload, cb)

    def _request_task(self, payload: bytes, done: Done) -> None:
        task = asyncio.ensure_future(self._request(payload, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, payload: bytes, done: Done) -> None:
        try:
            await self._client.request(payload)
        except Exception as exc:
            done(exc)
        else:
            done(None)

    def publish(self, payload: bytes) -> None:
        self._client.publish(payload)

    async def writable(self) -> None:
        if self._confirm:     # a window of unconfirmed publishes (the broker's CONFIRM frames)
            await self._client.confirmed(self._window)
        await self._client.drain()

    async def drain(self) -> None:
        if self._confirm:
            await self._client.confirmed(0)
        await self._client.drain()
        ping = getattr(self._client, "ping", None)
        if ping is not None:  # the exact barrier, once the client has one
            await ping()
        else:
            await _socket_barrier(self._client, BARRIER_TIMEOUT)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.close()


async def _socket_barrier(client: Any, timeout: float) -> None:
    """Wait until the broker has read every byte this client wrote (Linux, loopback or LAN).

    teomq.client has no public PING round trip yet (it would be the exact barrier: the broker
    answers a PING after every SEND before it). Instead: the client's buffer is flushed, the
    kernel's send queue is empty (SIOCOUTQ) and the broker's socket has nothing unread
    (rx_queue in /proc/net/tcp). The broker's core handles each read completely, so every
    SEND is then in its queue. Uses the client's transport (private), off the hot path only.
    """
    from teomq.errors import ConnectionLost

    loop = asyncio.get_running_loop()
    conn = getattr(client, "_conn", None)
    transport = getattr(conn, "_transport", None)
    if transport is None:
        raise ConnectionLost("not connected")
    sock = transport.get_extra_info("socket")
    local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    deadline = loop.time() + timeout
    await asyncio.sleep(0)  # the client flushes its write buffer on the next loop pass
    while True:
        if transport.is_closing():
            raise ConnectionLost("connection to the broker closed during drain()")
        if transport.get_write_buffer_size() == 0 and _unsent(sock) == 0 and not _unread_by_peer(local, peer):
            return
        if loop.time() > deadline:
            raise ConnectionLost(f"the broker did not read what was published within {timeout:g} s")
        await asyncio.sleep(0.001)


def _unsent(sock: Any) -> int:
    """Bytes in the kernel's send queue not yet acknowledged by the peer (0 if unknown)."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # == SIOCOUTQ
    except (AttributeError, OSError, ValueError):
        return 0
    return int(struct.unpack("i", buf)[0])


def _proc_net_addr(ip: str) -> str:
    """An address as /proc/net/tcp* writes it: 32-bit words in host byte order, in hex."""
    if ":" in ip:
        return "".join(f"{w:08X}" for w in struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, ip)))
    return f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}"


def _unread_by_peer(local: Any, peer: Any) -> int:
    """Bytes waiting unread in the peer's socket (its rx_queue in /proc/net/tcp*); 0 if not found."""
    if not (isinstance(local, tuple) and isinstance(peer, tuple)):
        return 0
    try:
        table = "/proc/net/tcp6" if ":" in peer[0] else "/proc/net/tcp"
        want_local = f"{_proc_net_addr(peer[0])}:{peer[1]:04X}"
        want_remote = f"{_proc_net_addr(local[0])}:{local[1]:04X}"
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    return int(parts[4].split(":")[1], 16)
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return 0


class _TeomqConsumer(ConsumerSide):
    def __init__(self, client: Any) -> None:
        self._client = client
        self._stats = client.stats

    @property
    def count(self) -> int:  # type: ignore[override]  # a read-only view of the base's attribute
        return self._stats["received"]

    async def close(self) -> None:
        await self._client.close()
