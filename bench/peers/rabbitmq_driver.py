"""RabbitMQ peer: rabbitmq-server (Debian) driven by aio-pika.

rpc      direct reply-to: the producer consumes the pseudo-queue ``amq.rabbitmq.reply-to`` (no ack)
         and publishes each request to the default exchange with ``reply_to`` set to it and a
         ``correlation_id``; consumers consume a (non-durable) queue with ``set_qos(prefetch_count=64)``
         (teomq's default prefetch), publish the answer to ``message.reply_to`` with the same
         correlation id and ack. Channels without publisher confirms.
publish  non-persistent messages to a non-durable queue; consumers as for rpc (prefetch 64, ack).
drain    durable queue, persistent messages (delivery_mode 2), publisher confirms: each batch
         the producer has queued is published concurrently and its confirms awaited
         (``asyncio.gather`` over ``exchange.publish``), at most CONFIRM_WINDOW unconfirmed;
         consumers prefetch 256 and ack each message.

Sends from the harness's synchronous calls go through one sender task per producer
(bench/peers/outbox.py). The server is a private node: its own node name, AMQP and
distribution ports, mnesia and log dirs, Erlang cookie (HOME) and epmd (ERL_EPMD_PORT), all
under the workdir and on 127.0.0.1; stop() stops that node and that epmd only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.abc

from peers.outbox import Outbox, Pending
from peers.server_process import free_port, once, spawn, tail, terminate
from teomq.benchmark.driver import (
    ConsumerSide,
    Done,
    Driver,
    Handler,
    ProducerSide,
    Server,
)

REPLY_TO = "amq.rabbitmq.reply-to"
PREFETCH = 64
DRAIN_PREFETCH = 256
CONFIRM_WINDOW = 1024   # unconfirmed publishes per producer (drain): as every system gets
RABBIT_BIN = "/usr/lib/rabbitmq/bin"


async def _declare(channel: aio_pika.abc.AbstractChannel, workload: str, queue: str) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(queue, durable=workload == "drain")


class RabbitProducer(ProducerSide):
    def __init__(self, conn: aio_pika.abc.AbstractConnection, workload: str, queue: str) -> None:
        self.conn = conn
        self.workload = workload
        self.queue = queue
        self._pending: Pending | None = None
        self._n = 0
        self._unconfirmed: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()
        self._n_unconfirmed = 0
        self.channel: Any = None
        self.exchange: Any = None
        sends: dict[str, Callable[[list[Any]], Awaitable[None]]] = {"rpc": self._send_requests, "publish": self._send_messages, "drain": self._send_confirmed}
        send = sends[workload]
        self._outbox = Outbox(send, name=f"rabbitmq-{workload}")

    async def start(self) -> None:
        self.channel = await self.conn.channel(publisher_confirms=self.workload == "drain")
        self.exchange = self.channel.default_exchange
        await _declare(self.channel, self.workload, self.queue)
        if self.workload == "rpc":
            self._pending = Pending()
            reply_queue = await self.channel.get_queue(REPLY_TO, ensure=False)
            await reply_queue.consume(self._on_reply, no_ack=True)

    def request(self, payload: bytes, done: Done) -> None:
        assert self._pending is not None
        self._n += 1
        cid = str(self._n)
        self._pending.add(cid, done)
        self._outbox.put(aio_pika.Message(payload, correlation_id=cid, reply_to=REPLY_TO))

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self._pending is not None
        self._pending.complete(message.correlation_id)

    def publish(self, payload: bytes) -> None:
        self._outbox.put(payload)

    async def _send_requests(self, items: list[aio_pika.Message]) -> None:
        publish, rk = self.exchange.publish, self.queue
        for message in items:
            await publish(message, rk, mandatory=False)

    async def _send_messages(self, items: list[bytes]) -> None:
        publish, rk, message = self.exchange.publish, self.queue, aio_pika.Message
        for payload in items:
            await publish(message(payload), rk, mandatory=False)

    async def _send_confirmed(self, items: list[bytes]) -> None:
        # every batch is published concurrently (aio-pika's way to keep confirms pipelined: one
        # publish() awaits its own confirm); the sender waits only while more than
        # CONFIRM_WINDOW messages are unconfirmed, which is what writable() waits for
        publish, rk, message = self.exchange.publish, self.queue, aio_pika.Message
        persistent = aio_pika.DeliveryMode.PERSISTENT
        batch = asyncio.gather(*(publish(message(p, delivery_mode=persistent), rk) for p in items))
        self._unconfirmed.append((len(items), batch))
        self._n_unconfirmed += len(items)
        while self._n_unconfirmed > CONFIRM_WINDOW:
            n, oldest = self._unconfirmed.popleft()
            await oldest  # raises DeliveryError on a nack, PublishError on a return
            self._n_unconfirmed -= n

    async def writable(self) -> None:
        await self._outbox.flushed()

    async def drain(self) -> None:
        await self._outbox.flushed()
        while self._unconfirmed:
            n, oldest = self._unconfirmed.popleft()
            await oldest
            self._n_unconfirmed -= n

    async def close(self) -> None:
        await self._outbox.close()
        for _, batch in self._unconfirmed:
            batch.cancel()
        if self._pending is not None:
            await self._pending.close()
        with contextlib.suppress(Exception):
            await self.conn.close()


class RabbitConsumer(ConsumerSide):
    def __init__(self, conn: aio_pika.abc.AbstractConnection, workload: str, queue: str, handler: Handler) -> None:
        self.conn = conn
        self.workload = workload
        self.queue = queue
        self.handler = handler
        self.count = 0
        self.exchange: Any = None

    async def start(self) -> None:
        channel = await self.conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=DRAIN_PREFETCH if self.workload == "drain" else PREFETCH)
        self.exchange = channel.default_exchange
        queue = await _declare(channel, self.workload, self.queue)
        await queue.consume(self._on_request if self.workload == "rpc" else self._on_message)

    async def _on_request(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.count += 1
        answer = aio_pika.Message(self.handler(message.body), correlation_id=message.correlation_id)
        # mandatory=False as in aio_pika.patterns.RPC: a direct reply-to name is not a queue, and
        # a mandatory publish to it is sometimes returned as unroutable
        await self.exchange.publish(answer, message.reply_to, mandatory=False)
        await message.ack()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.count += 1
        self.handler(message.body)
        await message.ack()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


def _rabbit_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", out)
    return m.group(1) if m else out


class RabbitDriver(Driver):
    name = "rabbitmq"
    durability = ("rpc, publish: memory (non-durable queue, transient messages); drain: durable queue, "
                  "persistent messages, confirmed after they are written to disk")
    description = ("aio-pika: rpc = direct reply-to (amq.rabbitmq.reply-to) + correlation_id, consumers "
                   "prefetch 64 + ack; publish = non-persistent to a queue; drain = durable queue, "
                   "persistent messages, publisher confirms (gather, window 1024), prefetch 256")

    def start_server(self, workdir: str) -> Server:
        base = os.path.join(workdir, "rabbitmq")
        os.makedirs(base, exist_ok=True)
        port = int(self.options.get("port") or free_port())
        dist_port, epmd_port = free_port(), free_port()
        node = f"teomqbench{port}@localhost"
        with open(os.path.join(base, "rabbitmq.conf"), "w") as f:
            f.write("log.console = true\nlog.console.level = warning\nlog.file = false\n")
        with open(os.path.join(base, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        open(os.path.join(base, "rabbitmq-env.conf"), "w").close()
        env = dict(
            os.environ,
            HOME=base,  # the Erlang cookie lives here
            RABBITMQ_NODENAME=node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(base, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(base, "log"),
            RABBITMQ_CONFIG_FILE=os.path.join(base, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(base, "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=os.path.join(base, "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(base, "enabled_plugins"),
            RABBITMQ_PID_FILE=os.path.join(base, "rabbitmq.pid"),
            # no scheduler busy-waiting: on 2 cores shared with the clients, spinning BEAM schedulers
            # take the CPU the clients need (RabbitMQ's runtime tuning guide: +sbwt none where
            # CPU is shared)
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=("-kernel inet_dist_use_interface {127,0,0,1} "
                                                 + self.options.get("erl_args", "+sbwt none +sbwtdcpu none +sbwtdio none")),
            ERL_EPMD_PORT=str(epmd_port),  # a private epmd: never the system's, stopped with the node
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        log = os.path.join(base, "server.log")
        proc = spawn([os.path.join(RABBIT_BIN, "rabbitmq-server")], log, env=env, cwd=base)

        def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run([os.path.join(RABBIT_BIN, "rabbitmqctl"), "-n", node, *args], env=env,
                                  cwd=base, capture_output=True, text=True, timeout=timeout, check=False)

        def stop() -> None:
            try:
                if proc.poll() is None:
                    with contextlib.suppress(OSError, subprocess.SubprocessError):
                        ctl("stop", timeout=60)
                terminate(proc, timeout=30)
            finally:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["epmd", "-port", str(epmd_port), "-kill"], env=env, capture_output=True,
                                   timeout=10, check=False)

        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rabbitmq-server exited with {proc.returncode}: {tail(log)}")
                res = ctl("await_startup", "--timeout", "60", timeout=90)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rabbitmq-server did not start: {res.stdout}{res.stderr}{tail(log)}")
                time.sleep(0.5)
            with open(env["RABBITMQ_PID_FILE"]) as f:
                pid = int(f.read().strip())
        except BaseException:
            stop()
            raise
        return Server(url=f"amqp://guest:guest@127.0.0.1:{port}/", pid=pid, stop=once(stop),
                      version=_rabbit_version(), log=log)

    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide:
        p = RabbitProducer(await aio_pika.connect(url, client_properties={"connection_name": f"producer-{index}"}),
                           workload, queue)
        await p.start()
        return p

    async def consumer(self, url: str, index: int, workload: str, queue: str, handler: Handler) -> ConsumerSide:
        c = RabbitConsumer(await aio_pika.connect(url, client_properties={"connection_name": f"consumer-{index}"}),
                           workload, queue, handler)
        await c.start()
        return c

    async def purge(self, url: str, queue: str) -> None:
        conn = await aio_pika.connect(url)
        try:
            channel = await conn.channel()
            await channel.queue_delete(queue)
        finally:
            await conn.close()
