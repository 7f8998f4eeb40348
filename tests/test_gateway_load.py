"""Load on the web port: 200 WebSocket clients on one stream while a TCP pair keeps working.

The broker, the TCP consumer and the TCP producer are real CLI processes; the 200 browsers are
``websockets`` clients in this process speaking the stock teoproxy client's packets. Every client
must receive every pushed value, in order, and the TCP pair must get every answer meanwhile.
The pushes are paced by the slowest client (at most WINDOW values ahead of it), not by sleeps.
Deadlines are hang guards for a loaded 2-core machine, not timing assertions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import websockets

import teomq
from procs import ProcGroup
from teomq._core import teoproxy as tp

CLIENTS = 200
VALUES = 300
PAIR_MESSAGES = 300
#: The pusher sends a value only once every client has received all but this many of those before it.
WINDOW = 50


async def stock_client(port: int, address: str) -> Any:
    """Connect as the original client.js does and subscribe to the num_players stream."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_queue=None)
    a = address.encode()
    for pid, cmd, data in ((0, tp.CONNECT, b""), (0, tp.CONNECT_TO, a), (0, tp.NEW_API_CLIENT, a),
                           (1, tp.SEND_TO, a + b",msg,Consumer"), (0, tp.STREAM, a + b",num_players"),
                           (2, tp.SEND_TO, a + b",msg,subscribe/num_players")):
        await ws.send(tp.encode(pid, cmd, data).decode())
    answers = 0
    while answers < 6:  # the six answers (all but the subscribe's can come in any order with it)
        p = tp.decode(await asyncio.wait_for(ws.recv(), 60), gateway=False)
        assert not p.error, p
        answers += 1
    return ws


class Progress:
    """How many values each client has received; the pusher waits on it (no sleeps)."""

    def __init__(self, clients: int) -> None:
        self.counts = [0] * clients
        self.changed = asyncio.Condition()

    async def got(self, client: int, n: int) -> None:
        self.counts[client] = n
        async with self.changed:
            self.changed.notify_all()

    async def wait_all(self, n: int, timeout: float) -> None:
        """Until every client has received at least ``n`` values (a hang guard of ``timeout`` s)."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: min(self.counts) >= n), timeout)


async def collect_values(ws: Any, n: int, progress: Progress, client: int) -> list[bytes]:
    got = []
    while len(got) < n:
        p = tp.decode(await ws.recv(), gateway=False)
        assert (p.id, p.cmd, p.error) == (0, tp.PUSH, False), p
        got.append(p.data)
        await progress.got(client, len(got))
    return got


def test_200_web_clients_get_every_value_while_a_tcp_pair_works(procs: ProcGroup) -> None:
    broker = procs.broker("-command", "num_players", "-command", "echo:queue", "-nomsg", "-log-level", "WARNING",
                          "-stat")
    web_port = broker.web_port
    consumer = procs.start("consumer", "-broker", broker.endpoint, "-subscribe", "echo", "-nomsg",
                           "-name", "tcp-consumer", label="consumer")
    consumer.wait_for_line(r"INFO teomq\.cli: tcp-consumer subscribed to echo$", stderr=True)

    async def main() -> dict[str, Any]:
        clients = [await stock_client(web_port, broker.address) for _ in range(CLIENTS)]
        loop = asyncio.get_running_loop()
        web_stat = rf"^stat: web sessions={CLIENTS} consumers={CLIENTS} pushes=0 encodes=0 bad_packets=0$"
        await loop.run_in_executor(None, broker.proc.wait_for_line, web_stat)  # the broker's -stat sees them
        progress = Progress(CLIENTS)
        readers = [asyncio.ensure_future(collect_values(ws, VALUES, progress, i)) for i, ws in enumerate(clients)]
        producer_proc = procs.start("producer", "-broker", broker.endpoint, "-command", "echo",
                                    "-count", str(PAIR_MESSAGES), "-delay", "5000", "-timeout", "60",
                                    "-nomsg", "-name", "tcp-producer", label="producer")
        start = time.monotonic()
        async with teomq.Producer(broker.endpoint) as pusher:
            for i in range(VALUES):
                if i >= WINDOW and i % 10 == 0:  # paced by the slowest client, in steps of 10 values
                    await pusher.drain()
                    await progress.wait_all(i - WINDOW, 240)
                pusher.publish(f"num_players/{i}".encode())
            got = await asyncio.wait_for(asyncio.gather(*readers), 240)
        pushed_in = time.monotonic() - start
        code = await loop.run_in_executor(None, producer_proc.wait, 240.0)
        for ws in clients:
            await ws.close()
        return {"got": got, "producer": producer_proc, "code": code, "seconds": pushed_in}

    with asyncio.Runner() as runner:
        result = runner.run(main())
    expected = [f"num_players/{i}".encode() for i in range(VALUES)]
    assert all(values == expected for values in result["got"])  # every value, in order, on every socket
    producer = result["producer"]
    assert result["code"] == 0, producer.describe()
    done = producer.wait_for_line(r"^tcp-producer done: sent (\d+), answered (\d+), errors (\d+)$")
    assert done.groups() == (str(PAIR_MESSAGES), str(PAIR_MESSAGES), "0"), producer.describe()
    print(f"\n{CLIENTS} web clients x {VALUES} values = {CLIENTS * VALUES} pushes in {result['seconds']:.1f} s; "
          f"TCP pair: {PAIR_MESSAGES}/{PAIR_MESSAGES} answered")
    # -log-level WARNING held: 200 sessions connecting and closing logged nothing
    assert not [line for line in broker.proc.err_lines if " INFO " in line], broker.proc.describe()
    assert not any("Traceback" in line for line in broker.proc.err_lines), broker.proc.describe()
