"""The contract between the benchmark harness and a system under test (teomq or a peer broker).

The harness (teomq.benchmark.harness) owns processes, clocks, latency samples, CPU accounting and
reports; a Driver only knows how to start its server and how to produce and consume with its usual
Python client, used idiomatically. The same harness drives every system, so figures compare.

Parent process:  driver.start_server(workdir) -> Server   (or Server.external(url) for a running one)
                 await driver.purge(url, queue)           before the run
Child processes: asyncio, one client connection each:
    producer = await driver.producer(url, index, workload, queue)
    consumer = await driver.consumer(url, index, workload, queue, handler)
    producer.request(payload, done)   done(err) is called once, on the loop, when the answer is in
    producer.publish(payload)         fire-and-forget / durable publish (workloads publish, drain)
    await producer.writable()         flow control only: wait while the client may not publish more
    await producer.drain()            barrier: everything publish() sent is accepted by the server
    await producer.close()            await consumer.close()

Workloads: "rpc" (request/answer, closed loop of W in flight per producer), "publish" (fire and
forget, consumers count), "drain" (publish N with no consumer, then start consumers and time the
drain). ``queue`` names the queue/subject/list the workload uses.

The harness calls publish() in batches of W (``--inflight``) and, between batches, yields to the
loop (``await asyncio.sleep(0)``, or sleeps until the next batch is due with ``--rate``) and
awaits writable(); at the end of a publish run and of the
drain workload's fill phase it awaits drain(). writable() defaults to drain(): a driver whose
drain() costs a round trip (confirms, a PING) should override writable() with its client's cheap
flow-control wait.

Refinements after the first version (all optional, with defaults): ``Server.log``,
``Server.external``, ``ProducerSide.writable``, ``ProducerSide.refused``, ``Driver.durability``,
``Driver.loop``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

#: rpc answer callback: None on success, else the error (timeout, refusal, lost connection).
Done = Callable[[BaseException | None], None]
#: consumer handler: message -> answer (rpc) ; for publish/drain the return value is ignored.
Handler = Callable[[bytes], bytes]


@dataclass
class Server:
    """A running server: where to connect and which process to charge CPU to."""

    url: str
    pid: int | None = None  # None: not measured (external server, or not ours)
    stop: Callable[[], None] = field(default=lambda: None)
    version: str = ""
    #: a file holding the server's output; the harness quotes its tail when a run fails
    log: str = ""

    @classmethod
    def external(cls, url: str, pid: int | None = None) -> Server:
        """A server someone else runs: never stopped here; measured only if ``pid`` is given."""
        return cls(url=url, pid=pid)


class ProducerSide(abc.ABC):
    #: messages the server refused (e.g. a full queue) as far as the client learns of it; the
    #: harness reads it at the end (optional: 0 if the client cannot tell)
    refused: int = 0

    @abc.abstractmethod
    def request(self, payload: bytes, done: Done) -> None:
        """Send one request; call ``done`` exactly once when its answer (or an error) arrives."""

    @abc.abstractmethod
    def publish(self, payload: bytes) -> None:
        """Send one message that needs no answer (queued durably where the workload says so)."""

    async def drain(self) -> None:
        """Wait until what publish() sent is accepted by the server (flow control, confirms)."""

    async def writable(self) -> None:
        """Wait while flow control says publish no more; default: drain() (see the module doc)."""
        await self.drain()

    @abc.abstractmethod
    async def close(self) -> None: ...


class ConsumerSide(abc.ABC):
    #: messages handled so far (the harness reads it for publish/drain)
    count: int = 0

    @abc.abstractmethod
    async def close(self) -> None: ...


class Driver(abc.ABC):
    #: short name used in tables and JSON: "teomq", "nats", "redis", "rabbitmq"
    name: str = ""
    #: human description of how the client is used, for the report
    description: str = ""
    #: what an accepted message survives: "memory" (a broker restart loses it), "fsync", ...
    durability: str = "unknown"
    #: event loop of this run ("uvloop" or "asyncio"), set by the harness before start_server()
    #: and in every client process; a driver that starts a Python server may use it there too
    loop: str = "asyncio"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        self.options = dict(options or {})

    @abc.abstractmethod
    def start_server(self, workdir: str) -> Server:
        """Start a private server on loopback (its own port) and return it; stop() must stop only it."""

    @abc.abstractmethod
    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide: ...

    @abc.abstractmethod
    async def consumer(self, url: str, index: int, workload: str, queue: str,
                       handler: Handler) -> ConsumerSide: ...

    async def purge(self, url: str, queue: str) -> None:
        """Remove what a previous run left in ``queue`` (durable peers)."""
