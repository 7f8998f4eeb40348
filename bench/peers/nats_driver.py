"""NATS peer: nats-server (Debian) driven by nats-py.

rpc      core NATS request/reply. Consumers: ``nc.subscribe(subject, queue="workers", cb=...)`` and
         ``await msg.respond(answer)``. Producer: what ``nc.request()`` does inside, without its Task
         and Future per request: one wildcard inbox subscription ``_INBOX.<nuid>.*`` (nats-py's
         "resp mux") and a map token -> done; requests go out with ``nc.publish(subject, payload,
         reply=_INBOX.<nuid>.<token>)`` from one sender task. Option ``rpc=request`` runs one Task
         per request around ``await nc.request(...)`` instead (measured slower: see bench/peers/README.md).
publish  core NATS ``nc.publish`` to a queue group (at most once: no persistence, no acks);
         ``drain()`` is ``nc.flush()`` (a PING answered once the server processed everything before it).
drain    JetStream: a stream with file storage; producer ``js.publish_async`` (acked by the stream,
         awaited in ``drain()``); consumers share one durable pull consumer, ``fetch(batch)`` and
         ``msg.ack()`` each message (explicit ack policy).

The server runs with JetStream enabled (``-js -sd <workdir>/jetstream``) for every workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.api
import nats.js.errors

from peers.outbox import Outbox, Pending
from peers.server_process import free_port, start_listening
from teomq.benchmark.driver import (
    ConsumerSide,
    Done,
    Driver,
    Handler,
    ProducerSide,
    Server,
)

QUEUE_GROUP = "workers"
DURABLE = "workers"
FETCH_BATCH = 256


def stream_name(queue: str) -> str:
    return "BENCH_" + re.sub(r"[^A-Za-z0-9_-]", "_", queue)


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"v?(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip()


#: unacked js.publish_async per producer (drain): as every system gets (nats-py's default: 4,000)
JS_PENDING = 1024


async def _connect(url: str, name: str) -> nats.NATS:
    # no reconnects: a benchmark must see a lost server, not wait through it
    return await nats.connect(url, name=name, allow_reconnect=False, connect_timeout=5)


async def _ensure_stream(nc: nats.NATS, queue: str) -> Any:
    js = nc.jetstream(publish_async_max_pending=JS_PENDING)
    name = stream_name(queue)
    cfg = nats.js.api.StreamConfig(name=name, subjects=[queue], storage=nats.js.api.StorageType.FILE)
    try:
        await js.add_stream(cfg)
    except nats.js.errors.BadRequestError:  # exists with another config (an older run): replace
        await js.delete_stream(name)
        await js.add_stream(cfg)
    return js


class NatsProducer(ProducerSide):
    def __init__(self, nc: nats.NATS, workload: str, queue: str, rpc_mode: str) -> None:
        self.nc = nc
        self.workload = workload
        self.queue = queue
        self.rpc_mode = rpc_mode
        self.js: Any = None
        self._acks: list[asyncio.Future[Any]] = []
        self._pending: Pending | None = None
        self._prefix = ""
        self._n = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        sends: dict[str, Callable[[list[Any]], Awaitable[None]]] = {"rpc": self._send_requests, "publish": self._send_messages, "drain": self._send_js}
        send = sends[workload]
        self._outbox = Outbox(send, name=f"nats-{workload}")

    async def start(self) -> None:
        if self.workload == "rpc" and self.rpc_mode == "mux":
            self._pending = Pending()
            self._prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(self._prefix + "*", cb=self._on_reply)
        elif self.workload == "drain":
            self.js = await _ensure_stream(self.nc, self.queue)

    # -- rpc -------------------------------------------------------------------------------

    def request(self, payload: bytes, done: Done) -> None:
        if self.rpc_mode == "request":
            task = asyncio.get_running_loop().create_task(self.nc.request(self.queue, payload, timeout=10.0))
            self._tasks.add(task)

            def finished(t: asyncio.Task[Any]) -> None:
                self._tasks.discard(t)
                done(asyncio.CancelledError() if t.cancelled() else t.exception())

            task.add_done_callback(finished)
            return
        assert self._pending is not None
        self._n += 1
        token = str(self._n)
        self._pending.add(token, done)
        self._outbox.put((self._prefix + token, payload))

    async def _send_requests(self, items: list[tuple[str, bytes]]) -> None:
        publish, subject = self.nc.publish, self.queue
        for reply, payload in items:
            await publish(subject, payload, reply=reply)

    async def _on_reply(self, msg: Any) -> None:
        assert self._pending is not None
        token = msg.subject[len(self._prefix):]
        if msg.headers and msg.headers.get("Status") == "503":
            self._pending.complete(token, nats.errors.NoRespondersError())
        else:
            self._pending.complete(token)

    # -- publish / drain ---------------------------------------------------------------------

    def publish(self, payload: bytes) -> None:
        self._outbox.put(payload)

    async def _send_messages(self, items: list[bytes]) -> None:
        publish, subject = self.nc.publish, self.queue
        for payload in items:
            await publish(subject, payload)

    async def _send_js(self, items: list[bytes]) -> None:
        publish_async, subject, acks = self.js.publish_async, self.queue, self._acks
        for payload in items:
            acks.append(await publish_async(subject, payload))

    async def writable(self) -> None:
        # the client's own flow control: nc.publish blocks once 2 MiB are pending (TCP
        # backpressure), js.publish_async once JS_PENDING acks are outstanding
        await self._outbox.flushed()

    async def drain(self) -> None:
        await self._outbox.flushed()
        if self.workload == "drain":
            await self.js.publish_async_completed()
            acks, self._acks = self._acks, []
            for fut in acks:
                fut.result()  # raises the stream's refusal, if any
        else:
            await self.nc.flush(timeout=30)

    async def close(self) -> None:
        await self._outbox.close()
        for t in list(self._tasks):
            t.cancel()
        if self._pending is not None:
            await self._pending.close()
        with contextlib.suppress(Exception):
            await self.nc.close()


class NatsConsumer(ConsumerSide):
    def __init__(self, nc: nats.NATS, workload: str, queue: str, handler: Handler) -> None:
        self.nc = nc
        self.workload = workload
        self.queue = queue
        self.handler = handler
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.workload == "rpc":
            await self.nc.subscribe(self.queue, queue=QUEUE_GROUP, cb=self._on_request)
        elif self.workload == "publish":
            await self.nc.subscribe(self.queue, queue=QUEUE_GROUP, cb=self._on_message)
        else:
            js = await _ensure_stream(self.nc, self.queue)
            # one durable pull consumer shared by every consumer process; more unacked messages
            # than the default 1000 so that several fetchers keep full batches in flight
            config = nats.js.api.ConsumerConfig(ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                                                max_ack_pending=FETCH_BATCH * 64)
            psub = await js.pull_subscribe(self.queue, durable=DURABLE, stream=stream_name(self.queue),
                                           config=config)
            self._task = asyncio.get_running_loop().create_task(self._fetch_loop(psub))

    async def _on_request(self, msg: Any) -> None:
        self.count += 1
        await msg.respond(self.handler(msg.data))

    async def _on_message(self, msg: Any) -> None:
        self.count += 1
        self.handler(msg.data)

    async def _fetch_loop(self, psub: Any) -> None:
        handler = self.handler
        while True:
            try:
                msgs = await psub.fetch(FETCH_BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                handler(msg.data)
                await msg.ack()
                self.count += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)  # bounded: never hang the harness on a close
        with contextlib.suppress(Exception):
            await self.nc.close()


class NatsDriver(Driver):
    name = "nats"
    durability = ("rpc, publish: none (core NATS, at most once); drain: JetStream file store "
                  "(acked once written to the OS, not fsynced per message: nats-server's default)")
    description = ("nats-py: rpc = queue-group subscribers + msg.respond, producer with one inbox "
                   "subscription and a reply map (nats-py's resp mux); publish = core publish to a "
                   "queue group; drain = JetStream file stream, js.publish_async (at most 1,024 unacked) + durable pull "
                   "consumer fetch(256) + ack")

    def start_server(self, workdir: str) -> Server:
        binary = self.options.get("binary") or shutil.which("nats-server") or "nats-server"
        port = int(self.options.get("port") or free_port())
        store = os.path.join(workdir, "nats-jetstream")
        log = os.path.join(workdir, "nats-server.log")
        return start_listening([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store], port, log,
                               f"nats://127.0.0.1:{port}", _version(binary))

    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide:
        nc = await _connect(url, f"bench-producer-{index}")
        p = NatsProducer(nc, workload, queue, self.options.get("rpc", "mux"))
        await p.start()
        return p

    async def consumer(self, url: str, index: int, workload: str, queue: str, handler: Handler) -> ConsumerSide:
        nc = await _connect(url, f"bench-consumer-{index}")
        c = NatsConsumer(nc, workload, queue, handler)
        await c.start()
        return c

    async def purge(self, url: str, queue: str) -> None:
        nc = await _connect(url, "bench-purge")
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream_name(queue))
        finally:
            await nc.close()
