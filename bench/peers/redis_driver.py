"""Redis peer: redis-server (Debian) driven by redis-py's asyncio client (``redis.asyncio``, hiredis parser).

rpc      list work queue. A request is one list item ``<reply list>\\n<correlation id>\\n<payload>``;
         the producer LPUSHes everything queued since its last turn in one multi-value LPUSH, and one
         reader task pops its own reply list (``<queue>:reply:<uuid>``) and matches correlation ids.
         Consumers pop the request list and LPUSH each answer ``<correlation id>\\n<answer>`` to the
         reply list it names, all answers of a batch in one pipeline.
         Popping: BLMPOP ... RIGHT COUNT 64 (Redis 7: BRPOP that returns up to COUNT items in one
         round trip; the batch plays the part of teomq's prefetch 64). Option ``pop=brpop``: plain
         BRPOP, one item per round trip.
publish  the same list: multi-value LPUSH, consumers pop batches and count.
drain    a stream and a consumer group: pipelined XADD (the reply is the acceptance), consumers
         XREADGROUP COUNT 256 + XACK of the batch. Durability: before the drain producer starts it
         switches the server to ``appendonly yes`` + ``appendfsync everysec`` (AOF written on every
         event-loop turn, fsync'ed once a second). rpc and publish run memory-only (no RDB, no AOF),
         like core NATS and RabbitMQ's non-persistent messages.

Connections: one client (connection pool) per producer/consumer process; a blocking pop holds
one pooled connection, sends take another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

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

GROUP = "workers"
POP_BATCH = 64
READ_BATCH = 256
BLOCK_S = 1.0


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, max_connections=8)


async def _pop(r: aioredis.Redis, key: str, n: int, mode: str) -> list[bytes]:
    """Up to ``n`` items from the right of list ``key``, waiting up to BLOCK_S for the first."""
    res: Any
    if mode == "brpop":
        res = await r.brpop([key], timeout=BLOCK_S)
        return [] if res is None else [res[1]]
    res = await r.blmpop(BLOCK_S, 1, key, direction="RIGHT", count=n)
    return [] if res is None else list(res[1])


class RedisProducer(ProducerSide):
    def __init__(self, r: aioredis.Redis, workload: str, queue: str, pop_mode: str) -> None:
        self.r = r
        self.workload = workload
        self.queue = queue
        self.pop_mode = pop_mode
        self.reply = f"{queue}:reply:{uuid.uuid4().hex}"
        self._reply_prefix = self.reply.encode() + b"\n"
        self._n = 0
        self._pending: Pending | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        sends: dict[str, Callable[[list[Any]], Awaitable[None]]] = {"rpc": self._lpush, "publish": self._lpush, "drain": self._xadd}
        send = sends[workload]
        self._outbox = Outbox(send, name=f"redis-{workload}")

    async def start(self) -> None:
        if self.workload == "rpc":
            self._pending = Pending()
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        elif self.workload == "drain":
            await _durable(self.r)
            await _ensure_group(self.r, self.queue)

    def request(self, payload: bytes, done: Done) -> None:
        assert self._pending is not None
        self._n += 1
        cid = str(self._n).encode()
        self._pending.add(cid, done)
        self._outbox.put(self._reply_prefix + cid + b"\n" + payload)

    def publish(self, payload: bytes) -> None:
        self._outbox.put(payload)

    async def _lpush(self, items: list[bytes]) -> None:
        await self.r.lpush(self.queue, *items)

    async def _xadd(self, items: list[bytes]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for payload in items:
            pipe.xadd(self.queue, {"d": payload})
        await pipe.execute()

    async def _read_replies(self) -> None:
        assert self._pending is not None
        complete = self._pending.complete
        try:
            while not self._closing:
                for item in await _pop(self.r, self.reply, 1024, self.pop_mode):
                    cid, _, _answer = item.partition(b"\n")
                    complete(cid)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._pending.fail_all(exc)
            raise

    async def drain(self) -> None:
        # a command's reply is the server's acceptance (and, for drain, its append to the AOF buffer)
        await self._outbox.flushed()

    async def writable(self) -> None:
        await self._outbox.flushed()

    async def close(self) -> None:
        await self._outbox.close()
        self._closing = True
        await _stop_task(self._reader)
        if self._pending is not None:
            await self._pending.close()
            with contextlib.suppress(Exception):
                await self.r.delete(self.reply)
        await self.r.aclose()


class RedisConsumer(ConsumerSide):
    def __init__(self, r: aioredis.Redis, index: int, workload: str, queue: str, handler: Handler,
                 pop_mode: str) -> None:
        self.r = r
        self.name = f"consumer-{index}-{uuid.uuid4().hex[:8]}"
        self.workload = workload
        self.queue = queue
        self.handler = handler
        self.pop_mode = pop_mode
        self.count = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        if self.workload == "drain":
            await _ensure_group(self.r, self.queue)
            loop = self._read_stream()
        else:
            loop = self._serve_list()
        self._task = asyncio.get_running_loop().create_task(loop)

    async def _serve_list(self) -> None:
        r, handler, rpc = self.r, self.handler, self.workload == "rpc"
        while not self._closing:
            items = await _pop(r, self.queue, POP_BATCH, self.pop_mode)
            if not items:
                continue
            if rpc:
                pipe = r.pipeline(transaction=False)
                for item in items:
                    reply, cid, payload = item.split(b"\n", 2)
                    pipe.lpush(reply, cid + b"\n" + handler(payload))
                await pipe.execute()
            else:
                for item in items:
                    handler(item)
            self.count += len(items)

    async def _read_stream(self) -> None:
        r, handler, queue = self.r, self.handler, self.queue
        while not self._closing:
            res: Any = await r.xreadgroup(GROUP, self.name, {queue: ">"}, count=READ_BATCH,
                                          block=int(BLOCK_S * 1000))
            if not res:
                continue
            # RESP2: [[stream, entries]]; RESP3: {stream: entries}
            entries = next(iter(res.values())) if isinstance(res, dict) else res[0][1]
            for _id, fields in entries:
                handler(fields[b"d"])
            await r.xack(queue, GROUP, *(e[0] for e in entries))
            self.count += len(entries)

    async def close(self) -> None:
        self._closing = True
        await _stop_task(self._task)
        await self.r.aclose()


async def _stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a loop around a blocking pop. redis-py may swallow the CancelledError of a blocking
    command (seen with BLMPOP: the loop went on popping), so the loops also check a flag, and
    this waits at most two BLOCK_S for them."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task}, timeout=2 * BLOCK_S + 1)
    if task.done() and not task.cancelled():
        with contextlib.suppress(BaseException):
            task.result()


async def _durable(r: aioredis.Redis) -> None:
    """AOF on, fsync every second (the drain workload's durability mode)."""
    if (await r.config_get("appendonly")).get("appendonly") != "yes":
        await r.config_set("appendfsync", "everysec")
        await r.config_set("appendonly", "yes")


async def _ensure_group(r: aioredis.Redis, stream: str) -> None:
    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.exceptions.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


class RedisDriver(Driver):
    name = "redis"
    durability = ("rpc, publish: memory (no RDB, no AOF); drain: AOF, appendfsync everysec "
                  "(a crash loses up to a second)")
    description = ("redis-py asyncio + hiredis: rpc = LPUSH request list / BLMPOP COUNT 64 / LPUSH to the "
                   "producer's reply list, one reply reader per producer; publish = LPUSH + BLMPOP; "
                   "drain = stream + consumer group, pipelined XADD, XREADGROUP COUNT 256 + XACK, "
                   "AOF everysec")

    def start_server(self, workdir: str) -> Server:
        binary = self.options.get("binary") or shutil.which("redis-server") or "redis-server"
        port = int(self.options.get("port") or free_port())
        data = os.path.join(workdir, "redis-data")
        os.makedirs(data, exist_ok=True)
        log = os.path.join(workdir, "redis-server.log")
        return start_listening([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", data, "--daemonize", "no", "--logfile", ""], port, log,
                               f"redis://127.0.0.1:{port}/0", _version(binary))

    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide:
        p = RedisProducer(_client(url), workload, queue, self.options.get("pop", "blmpop"))
        await p.start()
        return p

    async def consumer(self, url: str, index: int, workload: str, queue: str, handler: Handler) -> ConsumerSide:
        c = RedisConsumer(_client(url), index, workload, queue, handler, self.options.get("pop", "blmpop"))
        await c.start()
        return c

    async def purge(self, url: str, queue: str) -> None:
        r = _client(url)
        try:
            await r.delete(queue)
        finally:
            await r.aclose()


