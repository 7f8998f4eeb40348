#!/usr/bin/env python3
"""Stream pushes to many WebSockets: what one pushed message costs the broker, with the push
encoded once for every socket (the gateway's default) against once per socket.

A broker process (teomq.Broker + teomq.web.WebGateway, one fanout command ``num_players``,
``share_pushes`` on or off) and this process, which runs ``--clients`` WebSocket clients
speaking the stock teoproxy client's packets (Connect, ConnectTo, NewApiClient, msg Consumer,
Stream num_players, msg subscribe/num_players) and a TCP producer publishing ``--messages``
messages ``num_players/<i><padding>`` of ``--size`` bytes in bursts of 10. A run ends when every
client has every message. The broker's CPU (utime + stime from /proc/<pid>/stat) over the run,
divided by the pushes (clients x messages), is the figure; variants alternate, each figure is
the median of ``--repeat`` runs; every run checks that every client got every message in order.
A probe process meanwhile times sequential TCP round trips through the same broker (a queue
command ``echo`` answered by a consumer in the probe), for 1 s before the pushes and for 1 s
from their start: is the broker still responsive to TCP clients while it pushes?

    python bench/web_push.py                         # 200 clients, 100 B and 8 KiB, 3 runs each: ~3 min
    python bench/web_push.py --clients 50 --repeat 1 --sizes 100
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

import teomq
from teomq._core import teoproxy as tp
from teomq.benchmark.proc_stats import proc_counters

ROOT = Path(__file__).resolve().parent.parent

BROKER = """
import asyncio, logging, sys
from teomq import Broker
from teomq.commands import Command
from teomq.web import WebGateway
logging.basicConfig(level=logging.WARNING)
async def main():
    b = Broker(port=0, data_dir=sys.argv[1], record_address=False, log_messages=False,
               commands=[Command("num_players"), Command("echo", routing="queue")])
    await b.start()
    gw = WebGateway(b, port=0, share_pushes=sys.argv[2] == "shared", prefetch=int(sys.argv[3]))
    await gw.start()
    print(b.address, b.port, gw.port, flush=True)
    await b.serve_forever()
import uvloop
uvloop.run(main())
"""


PROBE = """
import asyncio, json, sys, time
import teomq
async def main():
    consumer = teomq.Consumer(sys.argv[1], name="probe")
    consumer.command("echo")(lambda call: call.data)
    async with consumer, teomq.Producer(sys.argv[1], timeout=30) as producer:
        await producer.request(b"echo/warm")
        print("ready", flush=True)
        for line in sys.stdin:  # each "go": sequential round trips for 1 s, then their latencies
            lat, end = [], time.perf_counter() + 1.0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await producer.request(b"echo/x")
                lat.append(time.perf_counter() - t0)
            lat.sort()
            print(json.dumps({"n": len(lat), "p50_us": 1e6 * lat[len(lat) // 2],
                              "p99_us": 1e6 * lat[int(len(lat) * 0.99)]}), flush=True)
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    c = proc_counters(pid)
    assert c is not None, f"process {pid} is gone"
    return (c["user_ns"] + c["sys_ns"]) / 1e9


async def client(port: int, address: str) -> Any:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_queue=None,
                                  max_size=None)
    a = address.encode()
    for pid, cmd, data in ((0, tp.CONNECT, b""), (0, tp.CONNECT_TO, a), (0, tp.NEW_API_CLIENT, a),
                           (1, tp.SEND_TO, a + b",msg,Consumer"), (0, tp.STREAM, a + b",num_players"),
                           (2, tp.SEND_TO, a + b",msg,subscribe/num_players")):
        await ws.send(tp.encode(pid, cmd, data).decode())
    for _ in range(6):
        assert not tp.decode(await ws.recv(), gateway=False).error
    return ws


async def receive(ws: Any, expected: list[bytes]) -> None:
    for want in expected:
        p = tp.decode(await ws.recv(), gateway=False)
        assert p.cmd == tp.PUSH and p.data == want, (p.id, p.cmd, p.data[:40])


async def one_run(variant: str, clients: int, messages: int, size: int, prefetch: int = 64) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", BROKER, tmp, variant, str(prefetch)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            address, port, web_port = proc.stdout.readline().split()
            url = f"{address}@127.0.0.1:{port}"
            probe = subprocess.Popen([sys.executable, "-c", PROBE, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
            sockets = [await client(int(web_port), address) for _ in range(clients)]
            assert probe.stdout.readline().strip() == "ready"
            idle = await asyncio.to_thread(probe_once, probe)
            payloads = [(f"num_players/{i}/".encode() + b"x" * size)[:max(size, 16)] for i in range(messages)]
            readers = [asyncio.ensure_future(receive(ws, payloads)) for ws in sockets]
            async with teomq.Producer(url) as producer:
                cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                busy = asyncio.ensure_future(asyncio.to_thread(probe_once, probe))
                for i, p in enumerate(payloads):
                    producer.publish(p)
                    if i % 10 == 9:
                        await producer.drain()
                        await asyncio.sleep(0)
                await asyncio.gather(*readers)
                cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
                loaded = await busy
            probe.stdin.close()
            probe.wait(10)
            for ws in sockets:
                await ws.close()
        finally:
            proc.terminate()
            proc.wait(10)
    pushes = clients * messages
    return {"variant": variant, "size": size, "pushes": pushes, "seconds": t1 - t0,
            "pushes_per_s": pushes / (t1 - t0), "broker_cpu_us_per_push": 1e6 * (cpu1 - cpu0) / pushes,
            "tcp_idle": idle, "tcp_under_pushes": loaded}


def probe_once(probe: subprocess.Popen[str]) -> dict[str, float]:
    """One second of sequential TCP round trips (echo command) in the probe process."""
    probe.stdin.write("go\n")
    probe.stdin.flush()
    return json.loads(probe.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--sizes", default="100,8192", help="message sizes in bytes, comma-separated")
    ap.add_argument("--messages", type=int, default=0, help="messages per run (default: 2,000 at <= 1 KiB, else 300)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        messages = args.messages or (2000 if size <= 1024 else 300)
        for r in range(args.repeat):
            order = ("shared", "per-socket") if r % 2 == 0 else ("per-socket", "shared")
            for variant in order:
                run = asyncio.run(one_run(variant, args.clients, messages, size))
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    lines = [f"# Stream pushes to {args.clients} WebSockets, {datetime.date.today()}", "",
             f"`python bench/web_push.py {' '.join(sys.argv[1:])}` (medians of {args.repeat} alternated runs; "
             f"broker, clients and producer on the same {os.cpu_count()} cores)", "",
             "TCP p50 / p99: a separate process's sequential round trips (`echo`, a queue command, to a TCP "
             "consumer in that process) for 1 s before the pushes (idle, the 200 sockets connected) and for the "
             "first second of the pushes.", "",
             "| size | push encoding | pushes/s | broker CPU us per push | TCP p50 / p99 us, idle | "
             "TCP p50 / p99 us, under pushes |", "|---:|---|---:|---:|---:|---:|"]
    for size in sorted({r["size"] for r in runs}):
        for variant in ("shared", "per-socket"):
            rs = [r for r in runs if r["size"] == size and r["variant"] == variant]
            lines.append(f"| {size:,} B | {'once per message' if variant == 'shared' else 'once per socket'} | "
                         f"{statistics.median(r['pushes_per_s'] for r in rs):,.0f} | "
                         f"{statistics.median(r['broker_cpu_us_per_push'] for r in rs):.2f} | "
                         f"{_lat(rs, 'tcp_idle')} | {_lat(rs, 'tcp_under_pushes')} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.md:
        args.md.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "argv": sys.argv[1:]}, indent=1))


def _lat(runs: list[dict[str, Any]], key: str) -> str:
    return (f"{statistics.median(r[key]['p50_us'] for r in runs):,.0f} / "
            f"{statistics.median(r[key]['p99_us'] for r in runs):,.0f}")


if __name__ == "__main__":
    main()
